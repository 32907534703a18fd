import Contracts
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// How an `RPCServer` listens and what it tolerates. Every limit has a default
/// that suits one service on a small machine.
public struct RPCServerConfiguration: Sendable {
    /// Interface to listen on. Default `127.0.0.1`; containers use `0.0.0.0`.
    public var host: String = "127.0.0.1"
    /// TCP port; 0 picks a free one (see `RPCServer.listeningAddress()`).
    public var port: Int = 0
    /// Largest frame payload accepted, in bytes. Default 4 MiB, as containerd/ttrpc.
    public var maxMessageSize: Int = 4 << 20
    /// Requests handled at once on one connection. Past it the server stops reading
    /// from that connection until one finishes (TCP backpressure). Default 256.
    public var maxInFlightPerConnection: Int = 256
    /// Open connections per process; further ones are closed at once. Default 1024.
    public var maxConnections: Int = 1024
    /// A connection with nothing in flight and nothing received for this long is closed. Default 5 minutes.
    public var idleTimeout: Duration = .seconds(300)
    /// When set, every call except to `unauthenticatedServices` must carry
    /// metadata `authorization: Bearer <token>`.
    public var authToken: String?
    /// Services reachable without a token. Default: health only.
    public var unauthenticatedServices: Set<String> = [HealthV1.Health.name]

    public init() {}
}

/// A ttrpc server on SwiftNIO. Run it as a ServiceLifecycle `Service`: on graceful
/// shutdown it stops accepting, stops reading new requests, finishes the calls in
/// flight and closes every connection.
public final class RPCServer: Service, Sendable {
    public let configuration: RPCServerConfiguration
    let router: RPCRouter
    let logger: Logger
    let group: any EventLoopGroup
    let metrics = RPCServerMetrics()
    private let listening: EventLoopPromise<SocketAddress>

    private struct State {
        var serverChannel: (any Channel)?
        var connections: [ObjectIdentifier: any Channel] = [:]
        var draining = false
    }
    private let state = Mutex(State())

    public init(configuration: RPCServerConfiguration, router: RPCRouter, logger: Logger,
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        self.configuration = configuration
        self.router = router
        self.logger = logger
        self.group = group
        self.listening = group.next().makePromise(of: SocketAddress.self)
    }

    /// The address the server listens on, once it does (fails if binding fails).
    public func listeningAddress() async throws -> SocketAddress {
        try await listening.futureResult.get()
    }

    /// Serves until graceful shutdown (or cancellation).
    public func run() async throws {
        let server: NIOAsyncChannel<NIOAsyncChannel<InboundFrame, OutboundFrame>, Never>
        do {
            server = try await bind()
        } catch {
            listening.fail(error)
            throw error
        }
        let address = server.channel.localAddress!
        state.withLock { $0.serverChannel = server.channel }
        listening.succeed(address)
        logger.info("rpc server listening", metadata: ["rpc.address": "\(address)"])

        try await withGracefulShutdownHandler {
            try await withThrowingDiscardingTaskGroup { group in
                try await server.executeThenClose { connections in
                    for try await connection in connections {
                        group.addTask { await self.serve(connection) }
                    }
                }
            }
        } onGracefulShutdown: {
            self.drain()
        }
        logger.info("rpc server stopped")
    }

    /// Stops accepting and stops reading new requests; calls in flight finish and
    /// are answered, then each connection closes and `run()` returns.
    public func drain() {
        let (server, connections) = state.withLock { state -> ((any Channel)?, [any Channel]) in
            state.draining = true
            return (state.serverChannel, Array(state.connections.values))
        }
        logger.info("rpc server draining", metadata: ["rpc.connections": "\(connections.count)"])
        server?.close(promise: nil)
        for connection in connections {
            connection.close(mode: .input, promise: nil)
        }
    }

    private func bind() async throws -> NIOAsyncChannel<NIOAsyncChannel<InboundFrame, OutboundFrame>, Never> {
        let maxMessageSize = configuration.maxMessageSize
        let idleTimeout = TimeAmount.nanoseconds(configuration.idleTimeout.nanoseconds)
        return try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 512)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .bind(host: configuration.host, port: configuration.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    let pipeline = channel.pipeline.syncOperations
                    try pipeline.addHandler(IdleStateHandler(readTimeout: idleTimeout))
                    try pipeline.addHandler(ByteToMessageHandler(TTRPCFrameDecoder(maxPayloadSize: maxMessageSize)))
                    try pipeline.addHandler(MessageToByteHandler(TTRPCFrameEncoder()))
                    try pipeline.addHandler(IdleConnectionCloser())
                    return try NIOAsyncChannel<InboundFrame, OutboundFrame>(wrappingChannelSynchronously: channel)
                }
            }
    }

    /// Registers a new connection, or refuses it when draining or at `maxConnections`.
    private func admit(_ channel: any Channel) -> Bool {
        state.withLock { state in
            guard !state.draining, state.connections.count < configuration.maxConnections else { return false }
            state.connections[ObjectIdentifier(channel)] = channel
            return true
        }
    }

    private func serve(_ connection: NIOAsyncChannel<InboundFrame, OutboundFrame>) async {
        let channel = connection.channel
        var peerLogger = self.logger
        peerLogger[metadataKey: "rpc.peer"] = "\(channel.remoteAddress.map { "\($0)" } ?? "?")"
        let logger = peerLogger
        guard admit(channel) else {
            metrics.rejectedConnections.increment()
            logger.warning("connection refused", metadata: [
                "rpc.reason": "\(state.withLock { $0.draining } ? "draining" : "maxConnections \(configuration.maxConnections) reached")",
            ])
            try? await channel.close()
            return
        }
        metrics.connections.increment()
        defer {
            metrics.connections.decrement()
            _ = state.withLock { $0.connections.removeValue(forKey: ObjectIdentifier(channel)) }
        }
        let limit = max(1, configuration.maxInFlightPerConnection)
        do {
            try await connection.executeThenClose { inbound, outbound in
                await withTaskGroup(of: Void.self) { calls in
                    var inFlight = 0
                    var lastStreamID: UInt32 = 0
                    do {
                        for try await frame in inbound {
                            switch frame {
                            case .oversize(let header):
                                guard header.kind == .request else { continue }
                                await self.reject(header.streamID, RPCError(.resourceExhausted,
                                    "message length \(header.length) exceeds maximum message size of \(self.configuration.maxMessageSize)"),
                                    outbound, logger)
                            case .frame(let header, let payload):
                                // Responses and stream data from a client are ignored, as containerd does.
                                guard header.kind == .request else { continue }
                                guard header.streamID % 2 == 1 else {
                                    await self.reject(header.streamID, RPCError(.invalidArgument,
                                        "StreamID must be odd for client initiated streams"), outbound, logger)
                                    continue
                                }
                                guard header.streamID > lastStreamID else {
                                    await self.reject(header.streamID, RPCError(.invalidArgument,
                                        "StreamID \(header.streamID) cannot be reused and must increase (last was \(lastStreamID))"),
                                        outbound, logger)
                                    continue
                                }
                                lastStreamID = header.streamID
                                if inFlight >= limit {
                                    // Backpressure: read nothing more until a call finishes.
                                    await calls.next()
                                    inFlight -= 1
                                }
                                inFlight += 1
                                calls.addTask {
                                    await self.handle(streamID: header.streamID, payload: payload, outbound: outbound, logger: logger)
                                }
                            }
                        }
                    } catch {
                        logger.debug("connection closed", metadata: ["rpc.error": "\(error)"])
                    }
                    // Finish and answer whatever is in flight before the connection closes.
                    await calls.waitForAll()
                }
            }
        } catch {
            logger.debug("connection ended", metadata: ["rpc.error": "\(error)"])
        }
    }

    private func reject(_ streamID: UInt32, _ error: RPCError, _ outbound: NIOAsyncChannelOutboundWriter<OutboundFrame>,
                        _ logger: Logger) async {
        logger.info("rpc rejected", metadata: [
            "rpc.stream_id": "\(streamID)", "rpc.code": "\(error.code)", "rpc.message": "\(error.message)",
        ])
        metrics.record(service: "unknown", method: "unknown", code: error.code, duration: .zero)
        try? await outbound.write(Self.responseFrame(streamID, .failure(error)))
    }

    static func responseFrame(_ streamID: UInt32, _ result: Result<[UInt8], RPCError>) -> OutboundFrame {
        var response = TTRPC.Response()
        var status = GoogleRPC.Status()
        switch result {
        case .success(let payload):
            response.payload = payload
        case .failure(let error):
            status.code = error.code.rawValue
            status.message = error.message
        }
        // Like containerd's server, an OK answer carries an (empty) status too.
        response.status = status
        return OutboundFrame(streamID: streamID, kind: .response, payload: response.serializedBytes())
    }

    /// Decodes, authenticates, routes and runs one call, racing its deadline, and writes the answer.
    private func handle(streamID: UInt32, payload: ByteBuffer, outbound: NIOAsyncChannelOutboundWriter<OutboundFrame>,
                        logger connectionLogger: Logger) async {
        let start = ContinuousClock.now
        metrics.inFlight.increment()
        defer { metrics.inFlight.decrement() }
        var streamLogger = connectionLogger
        streamLogger[metadataKey: "rpc.stream_id"] = "\(streamID)"
        let logger = streamLogger

        let answer = Answer()
        @Sendable func finish(_ result: Result<[UInt8], RPCError>, service: String, method: String) async {
            guard answer.claim() else { return }
            let duration = ContinuousClock.now - start
            metrics.record(service: service, method: method, code: result.code, duration: duration)
            var metadata: Logger.Metadata = [
                "rpc.service": "\(service)", "rpc.method": "\(method)", "rpc.code": "\(result.code)",
                "rpc.duration_ms": "\(Double(duration.nanoseconds) / 1e6)",
            ]
            if case .failure(let error) = result {
                metadata["rpc.message"] = "\(error.message)"
                logger.info("rpc failed", metadata: metadata)
            } else {
                logger.debug("rpc", metadata: metadata)
            }
            try? await outbound.write(Self.responseFrame(streamID, result))
        }

        let request: TTRPC.Request
        do {
            request = try TTRPC.Request(serializedBytes: payload.readableBytesView)
        } catch {
            await finish(.failure(RPCError(.invalidArgument, "unmarshal request error: \(error)")), service: "unknown", method: "unknown")
            return
        }
        let route: RPCRouter.Route
        do {
            route = try router.route(service: request.service, method: request.method)
        } catch {
            await finish(.failure(error), service: "unknown", method: "unknown")
            return
        }
        let service = request.service, method = request.method
        if let token = configuration.authToken, !configuration.unauthenticatedServices.contains(service) {
            let presented = request.metadata.first(where: { $0.key.lowercased() == "authorization" })?.value ?? ""
            guard constantTimeEqual(presented, "Bearer " + token) else {
                await finish(.failure(RPCError(.unauthenticated, "missing or invalid bearer token")), service: service, method: method)
                return
            }
        }
        if request.timeoutNano < 0 {
            await finish(.failure(RPCError(.deadlineExceeded, "deadline exceeded before the call started")), service: service, method: method)
            return
        }
        let deadline = request.timeoutNano > 0 ? start + .nanoseconds(request.timeoutNano) : nil
        let context = RPCContext(
            service: service, method: method,
            metadata: Metadata(request.metadata.map { (key: $0.key, value: $0.value) }),
            deadline: deadline, logger: logger)

        let run: @Sendable () async -> Result<[UInt8], RPCError> = { [logger] in
            do {
                let output = try await RPCDeadline.$current.withValue(deadline) {
                    try await route.handler(request.payload, context)
                }
                return .success(output)
            } catch let error as RPCError {
                return .failure(error)
            } catch is CancellationError {
                if let deadline, deadline <= .now { return .failure(RPCError(.deadlineExceeded, "deadline exceeded")) }
                return .failure(RPCError(.cancelled, "call cancelled"))
            } catch {
                logger.error("rpc handler failed", metadata: [
                    "rpc.service": "\(service)", "rpc.method": "\(method)", "rpc.error": "\(String(reflecting: error))",
                ])
                return .failure(RPCError(.internal, "internal error"))
            }
        }

        guard let deadline else {
            await finish(await run(), service: service, method: method)
            return
        }
        // Whichever finishes first answers: the handler, or the deadline. A handler that
        // ignores cancellation still occupies its in-flight slot until it returns.
        await withTaskGroup(of: Void.self) { race in
            race.addTask { await finish(await run(), service: service, method: method) }
            race.addTask {
                guard (try? await Task.sleep(until: deadline, clock: .continuous)) != nil else { return }
                await finish(.failure(RPCError(.deadlineExceeded, "deadline exceeded")), service: service, method: method)
            }
            await race.next()
            race.cancelAll()
        }
    }
}

/// Ensures a call is answered once.
private final class Answer: Sendable {
    private let claimed = Mutex(false)
    func claim() -> Bool {
        claimed.withLock { claimed in
            defer { claimed = true }
            return !claimed
        }
    }
}

extension Result where Failure == RPCError {
    var code: RPCError.Code {
        switch self {
        case .success: .ok
        case .failure(let error): error.code
        }
    }
}

/// Compares two strings in time that depends only on their lengths, not on where they differ.
func constantTimeEqual(_ a: String, _ b: String) -> Bool {
    let x = Array(a.utf8), y = Array(b.utf8)
    var difference = UInt8(x.count == y.count ? 0 : 1)
    for i in 0..<max(x.count, y.count) {
        difference |= (i < x.count ? x[i] : 0) ^ (i < y.count ? y[i] : 0)
    }
    return difference == 0
}

/// Closes a connection that has been idle (no request received, nothing in flight)
/// for the idle timeout. Counts requests going in and answers going out.
final class IdleConnectionCloser: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = InboundFrame
    typealias InboundOut = InboundFrame
    typealias OutboundIn = OutboundFrame
    typealias OutboundOut = OutboundFrame

    private var pending = 0

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .frame(let header, _) where header.kind == .request, .oversize(let header) where header.kind == .request:
            pending += 1
        default:
            break
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if unwrapOutboundIn(data).kind == .response { pending = max(0, pending - 1) }
        context.write(data, promise: promise)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            if pending == 0 { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}
