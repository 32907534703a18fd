import Logging
import NIOCore
import NIOPosix
import RPC

/// A logger that prints only critical messages, so that tests of failures stay quiet.
public func quietLogger(_ label: String) -> Logger {
    var logger = Logger(label: label)
    logger.logLevel = .critical
    return logger
}

/// Runs an `RPCServer` with `services` on a free loopback port for the duration of `body`,
/// which gets the server and its port.
public func withRPCServer<T: Sendable>(
    configure: (inout RPCServerConfiguration) -> Void = { _ in },
    services: [any RPCService],
    _ body: @Sendable (RPCServer, Int) async throws -> T
) async throws -> T {
    var configuration = RPCServerConfiguration()
    configuration.port = 0
    configure(&configuration)
    var router = RPCRouter()
    for service in services { router.register(service) }
    let server = RPCServer(configuration: configuration, router: router, logger: quietLogger("test"))
    return try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask {
            try await server.run()
            return nil
        }
        let port = try await server.listeningAddress().port!
        let result = try await body(server, port)
        group.cancelAll()
        return result
    }
}

/// A TCP server on a loopback port that accepts connections and never answers; close it after.
public func silentServer() async throws -> any Channel {
    try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .childChannelInitializer { $0.eventLoop.makeSucceededVoidFuture() }
        .bind(host: "127.0.0.1", port: 0).get()
}
