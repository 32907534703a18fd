import Contracts

/// A group of methods served together, such as one `service` of a .proto file.
public protocol RPCService: Sendable {
    /// Registers this service's handlers.
    func register(in router: inout RPCRouter)
}

/// Maps `service/method` to handlers. Built once before the server starts.
public struct RPCRouter: Sendable {
    typealias Handler = @Sendable ([UInt8], RPCContext) async throws -> [UInt8]

    struct Route: Sendable {
        let descriptor: any AnyMethodDescriptor
        /// Where the handler runs; nil: the server's `handlerExecution`.
        let execution: RPCServerConfiguration.HandlerExecution?
        let handler: Handler
    }

    private(set) var routes: [String: [String: Route]] = [:]

    public init() {}

    /// Registers `handler` for `method`. The request payload is decoded before the handler runs;
    /// a payload that does not decode is answered INVALID_ARGUMENT without calling it.
    ///
    /// `execution` overrides the server's `handlerExecution` for this method: a handler that
    /// only computes and awaits, on a server whose other handlers block, can run on the event
    /// loop (no thread hop), and a method that may block can be kept off it. A handler on the
    /// loop that must block moves that part off it (`withTaskExecutorPreference`).
    public mutating func register<Input, Output>(
        _ method: MethodDescriptor<Input, Output>,
        execution: RPCServerConfiguration.HandlerExecution? = nil,
        _ handler: @escaping @Sendable (Input, RPCContext) async throws -> Output
    ) {
        routes[method.service, default: [:]][method.method] = Route(descriptor: method, execution: execution) { payload, context in
            let request: Input
            do {
                request = try Input(serializedBytes: payload)
            } catch let error as ProtoDecodingError {
                throw RPCError(.invalidArgument, error.description)
            }
            return try await handler(request, context).serializedBytes()
        }
    }

    /// Registers every method of `service`.
    public mutating func register(_ service: some RPCService) {
        service.register(in: &self)
    }

    /// The names of the services served.
    public var serviceNames: [String] { routes.keys.sorted() }

    /// Every method served, sorted by service and method.
    public var methods: [any AnyMethodDescriptor] {
        routes.keys.sorted().flatMap { service in
            routes[service]!.keys.sorted().map { routes[service]![$0]!.descriptor }
        }
    }

    /// The route for a call, or UNIMPLEMENTED as containerd's server words it.
    func route(service: String, method: String) throws(RPCError) -> Route {
        guard let methods = routes[service] else { throw RPCError(.unimplemented, "service \(service)") }
        guard let route = methods[method] else { throw RPCError(.unimplemented, "method \(method)") }
        return route
    }
}
