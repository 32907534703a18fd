import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// A real HTTP server on a loopback port that records every POST it receives (a webhook
/// receiver for tests and the dispatch benchmark). It can be told to fail the next N
/// requests with a status, as a receiver that is down for a while and recovers, or to hang.
public final class WebhookSink: Sendable {
    public struct Request: Sendable {
        /// Header names in lower case.
        public var headers: [String: String]
        public var body: [UInt8]
        public var bodyText: String { String(decoding: body, as: UTF8.self) }
    }

    let state = Mutex<(requests: [Request], failNext: Int, failStatus: Int, retryAfter: String?, location: String?, answered: Int, holdAfter: Int?)>(([], 0, 503, nil, nil, 0, nil))
    /// Answers 200 at once, then sends the body a byte every 200 ms (of 1,000).
    let trickles = Atomic<Bool>(false)
    let channel: any Channel
    public let port: Int

    private init(channel: any Channel) {
        self.channel = channel
        port = channel.localAddress!.port!
    }

    /// Listens on 127.0.0.1 (a free port unless given).
    public static func start(port: Int = 0, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> WebhookSink {
        let box = NIOLockedValueBox<WebhookSink?>(nil)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.pipeline.configureHTTPServerPipeline().flatMap {
                    channel.pipeline.addHandler(Handler(sink: { box.withLockedValue { $0 }! }))
                }
            }
            .bind(host: "127.0.0.1", port: port).get()
        let sink = WebhookSink(channel: channel)
        box.withLockedValue { $0 = sink }
        return sink
    }

    /// Answers the next `count` requests with `status` (and does not record them), with a
    /// `Retry-After` header when given.
    /// With `location`, a `Location` header too (a redirect).
    public func fail(next count: Int, status: Int = 503, retryAfter: String? = nil, location: String? = nil) {
        state.withLock { $0.failNext = count; $0.failStatus = status; $0.retryAfter = retryAfter; $0.location = location }
    }

    /// Once `count` requests have been answered, records later ones but never answers them
    /// (nil: answer again): a receiver that hangs, for a sender about to be killed, so the
    /// kill lands mid-dispatch however slow the machine is.
    public func holdResponses(after count: Int?) {
        state.withLock { $0.holdAfter = count }
    }

    /// With `on`, answers 200 with its headers at once, then the body a byte every 200 ms (of
    /// 1,000): a receiver that keeps a sender reading.
    public func trickleBodies(_ on: Bool) {
        trickles.store(on, ordering: .relaxed)
    }

    /// Requests answered 2xx (or held), in arrival order.
    public var requests: [Request] { state.withLock { $0.requests } }
    /// Every request answered, failed ones included.
    public var answered: Int { state.withLock { $0.answered } }
    /// Distinct `Idempotency-Key`s among the accepted requests: what a receiver that
    /// discards duplicates keeps.
    public var distinctKeys: Set<String> { Set(requests.compactMap { $0.headers["idempotency-key"] }) }

    public func close() async { try? await channel.close() }

    /// Records a request: the status to answer and its Retry-After, nil to hold it.
    func receive(_ request: Request) -> (status: Int, retryAfter: String?, location: String?)? {
        state.withLock { state in
            if let limit = state.holdAfter, state.answered >= limit {
                state.requests.append(request)
                return nil
            }
            state.answered += 1
            if state.failNext > 0 {
                state.failNext -= 1
                return (state.failStatus, state.retryAfter, state.location)
            }
            state.requests.append(request)
            return (200, nil, nil)
        }
    }

    final class Handler: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let sink: @Sendable () -> WebhookSink
        var headers: [String: String] = [:]
        var body: [UInt8] = []
        var keepAlive = true

        init(sink: @escaping @Sendable () -> WebhookSink) { self.sink = sink }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                headers = Dictionary(head.headers.map { ($0.name.lowercased(), $0.value) }, uniquingKeysWith: { a, _ in a })
                body = []
                keepAlive = head.isKeepAlive
            case .body(var buffer):
                body += buffer.readBytes(length: buffer.readableBytes) ?? []
            case .end:
                guard let (status, retryAfter, location) = sink().receive(Request(headers: headers, body: body)) else { return }  // held: never answered
                if sink().trickles.load(ordering: .relaxed) {
                    var head = HTTPResponseHead(version: .http1_1, status: .ok)
                    head.headers.add(name: "Content-Length", value: "1000")
                    context.writeAndFlush(wrapOutboundOut(.head(head)), promise: nil)
                    let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                    let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
                    context.eventLoop.scheduleRepeatedTask(initialDelay: .milliseconds(200), delay: .milliseconds(200)) { task in
                        guard bound.value.channel.isActive else { task.cancel(); return }
                        bound.value.writeAndFlush(handler.value.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: "x")))), promise: nil)
                    }
                    return
                }
                var head = HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: status))
                head.headers.add(name: "Content-Length", value: "0")
                if let retryAfter { head.headers.add(name: "Retry-After", value: retryAfter) }
                if let location { head.headers.add(name: "Location", value: location) }
                if !keepAlive { head.headers.add(name: "Connection", value: "close") }
                let keep = keepAlive
                context.write(wrapOutboundOut(.head(head)), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
                    if !keep { context.close(promise: nil) }
                }
            }
        }
    }
}
