import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import ServiceLifecycle
import Synchronization

/// The HTTP admin port, for container probes and scraping:
/// - `GET /healthz`: 200 while the process runs (liveness), also while its stores open
/// - `GET /readyz`: 200 once the RPC server listens and until draining starts, else 503 (readiness)
/// - `GET /metrics`: Prometheus text format
///
/// One request per connection (the answer says `connection: close`), at most
/// `maxConnections` open, each closed after `idleTimeout` without a request.
public final class AdminServer: Service, Sendable {
    let host: String
    let port: Int
    let registry: PrometheusCollectorRegistry
    let isReady: @Sendable () -> Bool
    let logger: Logger
    let group: any EventLoopGroup
    private let listening: EventLoopPromise<SocketAddress>
    /// The time a connection has to send its request and read its answer (default 10 s).
    let requestTimeout: TimeAmount

    public init(host: String, port: Int, registry: PrometheusCollectorRegistry, logger: Logger,
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, requestTimeout: TimeAmount = .seconds(10),
                isReady: @escaping @Sendable () -> Bool) {
        self.requestTimeout = requestTimeout
        self.host = host
        self.port = port
        self.registry = registry
        self.isReady = isReady
        self.logger = logger
        self.group = group
        self.listening = group.next().makePromise(of: SocketAddress.self)
    }

    /// The address the admin server listens on, once it does.
    public func listeningAddress() async throws -> SocketAddress {
        try await listening.futureResult.get()
    }

    /// Open admin connections at most; more are closed at once.
    static let maxConnections = 64
    /// A connection that sends nothing for this long is closed (also one whose client does
    /// not read its answer).
    static let idleTimeout = TimeAmount.seconds(30)

    /// The listening channel, once `bind` has run.
    private let bound = Mutex<(any Channel)?>(nil)

    /// Binds the port; `run` does if this was not called first. A service binds before its
    /// stores open, so a port in use stops it at once, not after a long recovery.
    public func bind() async throws {
        guard bound.withLock({ $0 }) == nil else { return }
        let registry = self.registry
        let isReady = self.isReady
        let requestTimeout = self.requestTimeout
        let open = ConnectionCount()
        let channel: any Channel
        do {
            channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    guard open.count.add(1, ordering: .relaxed).newValue <= Self.maxConnections else {
                        open.count.subtract(1, ordering: .relaxed)
                        return channel.close()
                    }
                    channel.closeFuture.whenComplete { _ in open.count.subtract(1, ordering: .relaxed) }
                    return channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: Self.idleTimeout))
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                        try channel.pipeline.syncOperations.addHandler(AdminHandler(registry: registry, isReady: isReady, requestTimeout: requestTimeout))
                    }
                }
                .bind(host: host, port: port).get()
        } catch {
            listening.fail(error)
            throw error
        }
        bound.withLock { $0 = channel }
        listening.succeed(channel.localAddress!)
        logger.info("admin server listening", metadata: ["admin.address": "\(channel.localAddress!)"])
    }

    /// Serves until graceful shutdown or cancellation.
    public func run() async throws {
        try await bind()
        let channel = bound.withLock { $0 }!
        try await withTaskCancellationOrGracefulShutdownHandler {
            try await channel.closeFuture.get()
        } onCancelOrGracefulShutdown: {
            channel.close(promise: nil)
        }
    }
}

/// The admin connections open now.
final class ConnectionCount: Sendable {
    let count = Atomic<Int>(0)
}

/// Answers one request per connection, then closes it: a client that pipelines requests
/// and reads no answer holds one answer in memory, not one per request (keep-alive let a
/// single connection queue gigabytes of /metrics).
final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let registry: PrometheusCollectorRegistry
    let isReady: @Sendable () -> Bool
    private var answered = false
    /// Closes a connection `requestTimeout` after it opened, whether its request has not
    /// arrived whole or its answer has not been read by then (one request per connection):
    /// without it, a client sending, or reading, a byte now and then held one of the
    /// `maxConnections` slots for ever, and 64 of them kept the probes out.
    let requestTimeout: TimeAmount
    private var deadline: Scheduled<Void>?

    init(registry: PrometheusCollectorRegistry, isReady: @escaping @Sendable () -> Bool, requestTimeout: TimeAmount) {
        self.registry = registry
        self.isReady = isReady
        self.requestTimeout = requestTimeout
    }

    func channelActive(context: ChannelHandlerContext) {
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        deadline = context.eventLoop.scheduleTask(in: requestTimeout) { bound.value.close(promise: nil) }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline?.cancel()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent { context.close(promise: nil) } else { context.fireUserInboundEventTriggered(event) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .head(let head) = unwrapInboundIn(data), !answered else { return }
        answered = true
        let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
        let (status, contentType, body): (HTTPResponseStatus, String, [UInt8])
        switch (head.method, path) {
        case (.GET, "/healthz"):
            (status, contentType, body) = (.ok, "text/plain", Array("ok\n".utf8))
        case (.GET, "/readyz"):
            (status, contentType, body) = isReady()
                ? (.ok, "text/plain", Array("ready\n".utf8))
                : (.serviceUnavailable, "text/plain", Array("not ready\n".utf8))
        case (.GET, "/metrics"):
            (status, contentType, body) = (.ok, "text/plain; version=0.0.4", registry.emitToBuffer())
        case (_, "/healthz"), (_, "/readyz"), (_, "/metrics"):
            (status, contentType, body) = (.methodNotAllowed, "text/plain", Array("use GET\n".utf8))
        default:
            (status, contentType, body) = (.notFound, "text/plain", Array("not found: try /healthz, /readyz or /metrics\n".utf8))
        }
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: contentType)
        headers.add(name: "content-length", value: "\(body.count)")
        headers.add(name: "connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }
}
