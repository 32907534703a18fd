import Contracts
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// How an `RPCClient` connects, waits and retries.
public struct RPCClientConfiguration: Sendable {
    /// How long a TCP connect may take. Default 2 s.
    public var connectTimeout: Duration = .seconds(2)
    /// Deadline for calls that set none and run outside a handler's deadline. Default none.
    public var defaultTimeout: Duration?
    /// Attempts per call, the first included. A call is retried when nothing was sent (the
    /// connection could not be made, or its stream ids ran out), or when an idempotent
    /// method answered UNAVAILABLE. Default 3.
    public var maxAttempts: Int = 3
    /// Backoff before the first retry and after each failed connect; doubles up to `maxBackoff`, with jitter.
    public var initialBackoff: Duration = .milliseconds(50)
    public var maxBackoff: Duration = .seconds(2)
    /// Largest response payload accepted. Default 4 MiB.
    public var maxMessageSize: Int = 4 << 20
    /// Metadata sent with every call (e.g. `authorization`).
    public var metadata: Metadata = [:]
    /// The first stream id of each connection (odd; tests start near the end of the range).
    var firstStreamID: UInt32 = 1

    public init() {}

    /// A configuration that sends `authorization: Bearer <token>` with every call.
    public static func withToken(_ token: String?) -> RPCClientConfiguration {
        var configuration = RPCClientConfiguration()
        if let token { configuration.metadata.add("authorization", "Bearer \(token)") }
        return configuration
    }
}

/// A ttrpc client for one server address: one multiplexed connection, opened on
/// first use and reopened (with backoff) after it drops. Safe to share.
public final class RPCClient: Sendable {
    public let host: String
    public let port: Int
    public let configuration: RPCClientConfiguration
    /// The event loop every connection of this client lives on (picked from the group once).
    /// Tasks that prefer it (`EventLoopTaskExecutor(client.eventLoop)`) send and receive
    /// without a thread hop.
    public let eventLoop: any EventLoop

    private struct State {
        var connection: ClientConnection?
        var connecting: EventLoopFuture<ClientConnection>?
        var failures = 0
        var retryAfter: ContinuousClock.Instant?
        var closed = false
    }
    private let state = Mutex(State())

    public init(host: String, port: Int, configuration: RPCClientConfiguration = .init(),
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        self.host = host
        self.port = port
        self.configuration = configuration
        eventLoop = group.next()
    }

    /// Closes the connection; pending calls fail with UNAVAILABLE and later calls are refused.
    public func close() {
        let (connection, connecting) = state.withLock { state -> (ClientConnection?, EventLoopFuture<ClientConnection>?) in
            state.closed = true
            defer { (state.connection, state.connecting) = (nil, nil) }
            return (state.connection, state.connecting)
        }
        connection?.channel.close(promise: nil)
        // A connect under way (its callers may have left at their deadlines) is closed when it ends.
        connecting?.whenSuccess { $0.channel.close(promise: nil) }
    }

    /// Calls `method`. The deadline is `timeout`, else the enclosing handler's remaining
    /// budget (`RPCDeadline.current`), else `configuration.defaultTimeout`; whichever is
    /// soonest is sent as `timeout_nano`. Throws `RPCError`.
    public func call<Input, Output>(
        _ method: MethodDescriptor<Input, Output>, _ request: Input,
        metadata: Metadata = [:], timeout: Duration? = nil
    ) async throws(RPCError) -> Output {
        let payload = try await call(method, payload: request.serializedBytes(), metadata: metadata, timeout: timeout)
        do {
            return try Output(serializedBytes: payload)
        } catch {
            throw RPCError(.internal, "response of \(method.fullName) does not decode: \(error)")
        }
    }

    /// Calls `method` with a request already encoded and returns the encoded response (for
    /// tools that work on bytes, such as `arbiter call`). Deadlines and retries as `call`.
    public func call(
        _ method: any AnyMethodDescriptor, payload: [UInt8],
        metadata: Metadata = [:], timeout: Duration? = nil
    ) async throws(RPCError) -> [UInt8] {
        let now = ContinuousClock.now
        let deadline = [timeout.map { now + $0 }, RPCDeadline.current, configuration.defaultTimeout.map { now + $0 }]
            .compactMap { $0 }.min()
        var envelope = TTRPC.Request(method, payload: payload, metadata: configuration.metadata.wire + metadata.wire)

        var attempt = 1
        while true {
            do {
                return try await attemptCall(&envelope, deadline: deadline, allowRetry: method.isIdempotent)
            } catch let failure as Failure {
                guard attempt < configuration.maxAttempts, failure.retryable else { throw failure.error }
                let backoff = Self.backoff(attempt: attempt, initial: configuration.initialBackoff, max: configuration.maxBackoff)
                if let deadline, ContinuousClock.now + backoff >= deadline { throw failure.error }
                do { try await Task.sleep(for: backoff) } catch { throw RPCError(.cancelled, "call cancelled") }
                attempt += 1
            } catch {
                throw error as! RPCError
            }
        }
    }

    private struct Failure: Error {
        var error: RPCError
        var retryable: Bool
    }

    /// Exponential backoff with full jitter in its upper half.
    static func backoff(attempt: Int, initial: Duration, max: Duration) -> Duration {
        let exponent = Swift.min(attempt - 1, 20)
        let ceiling = Swift.min(initial * (1 << exponent), max)
        return ceiling * Double.random(in: 0.5...1.0)
    }

    private func attemptCall(_ envelope: inout TTRPC.Request, deadline: ContinuousClock.Instant?,
                             allowRetry: Bool) async throws -> [UInt8] {
        let connection: ClientConnection
        switch await connect(deadline: deadline) {
        case .success(let open):
            connection = open
        case .failure(let error):
            // Nothing was sent: safe to retry for any method.
            throw Failure(error: error, retryable: error.code == .unavailable)
        }
        if let deadline {
            let remaining = ContinuousClock.now.duration(to: deadline)
            guard remaining > .zero else { throw Failure(error: RPCError(.deadlineExceeded, "deadline exceeded"), retryable: false) }
            envelope.timeoutNano = Swift.max(1, remaining.nanoseconds)
        } else {
            envelope.timeoutNano = 0
        }
        let bytes = envelope.serializedBytes()
        guard bytes.count <= configuration.maxMessageSize else {
            throw Failure(error: RPCError(.resourceExhausted,
                "message length \(bytes.count) exceeds maximum message size of \(configuration.maxMessageSize)"), retryable: false)
        }
        let response: TTRPC.Response
        switch await connection.send(bytes, deadline: deadline) {
        case .success(let answer):
            response = answer
        case .failure(let error):
            // Not sent when the connection's stream ids ran out: safe to retry for any method
            // (on a new connection).
            let unsent = error.message == ClientCallHandler.exhaustedMessage
            throw Failure(error: error, retryable: (allowRetry || unsent) && error.code == .unavailable)
        }
        if let status = response.status, status.code != 0 {
            let error = RPCError(RPCError.Code(rawValue: status.code), status.message)
            // The server is draining this connection: the retry, and every later call, go on a
            // new one (to another instance, behind a balancer).
            if error.code == .unavailable && error.message == RPCServer.drainingMessage { connection.retire() }
            throw Failure(error: error, retryable: allowRetry && error.code == .unavailable)
        }
        return response.payload
    }

    /// The connection, opened if need be. A call with a deadline waits for a connect no longer
    /// than that (a host that swallows SYNs takes the whole `connectTimeout`); the connect
    /// goes on for later calls.
    private func connect(deadline: ContinuousClock.Instant?, again: Bool = true) async -> Result<ClientConnection, RPCError> {
        enum Step { case ready(ClientConnection), start(EventLoopFuture<ClientConnection>), wait(EventLoopFuture<ClientConnection>), fail(RPCError) }
        let step: Step = state.withLock { state in
            if state.closed { return .fail(RPCError(.unavailable, "client for \(host):\(port) is closed")) }
            if let connection = state.connection, connection.channel.isActive, !connection.isExhausted {
                return .ready(connection)
            }
            state.connection = nil
            if let connecting = state.connecting { return .wait(connecting) }
            if let retryAfter = state.retryAfter, retryAfter > .now {
                return .fail(RPCError(.unavailable,
                    "cannot reach \(host):\(port): the last connect failed; next attempt in \(retryAfter - .now)"))
            }
            let future = self.openConnection()
            state.connecting = future
            return .start(future)
        }
        switch step {
        case .ready(let connection):
            return .success(connection)
        case .fail(let error):
            return .failure(error)
        case .start(let future):
            // Its outcome is kept when it ends, whether or not a caller still waits for it (all
            // may have left at their deadlines): a later call finds the connection, or the
            // failure's backoff, never a connect that ended long before it came.
            future.whenComplete { [self] result in settle(future, result) }
            return await take(future, deadline: deadline, again: again)
        case .wait(let future):
            return await take(future, deadline: deadline, again: again)
        }
    }

    /// Records how a connect ended, unless the client was closed meanwhile (`close` closes
    /// the connection then).
    private func settle(_ future: EventLoopFuture<ClientConnection>, _ result: Result<ClientConnection, any Error>) {
        state.withLock { state in
            guard state.connecting === future else { return }
            state.connecting = nil
            switch result {
            case .success(let connection):
                state.connection = connection
                state.failures = 0
                state.retryAfter = nil
            case .failure:
                state.failures += 1
                state.retryAfter = .now + Self.backoff(attempt: state.failures, initial: configuration.initialBackoff,
                                                       max: configuration.maxBackoff)
            }
        }
    }

    /// Waits for `future`'s connection, until this call's deadline.
    private func take(_ future: EventLoopFuture<ClientConnection>, deadline: ContinuousClock.Instant?,
                      again: Bool) async -> Result<ClientConnection, RPCError> {
        do {
            let connection = try await Self.wait(for: future, until: deadline)
            if state.withLock({ $0.closed }) { return .failure(RPCError(.unavailable, "client for \(host):\(port) is closed")) }
            // Closed since it was made (taken up before `settle` ran, by a caller that waited
            // long): once more, afresh.
            if !connection.channel.isActive && again {
                state.withLock { state in
                    if state.connecting === future { state.connecting = nil }
                    if state.connection === connection { state.connection = nil }
                }
                return await connect(deadline: deadline, again: false)
            }
            return .success(connection)
        } catch let error as RPCError {
            return .failure(error)  // this call's deadline or cancellation: the connect goes on
        } catch {
            return .failure(RPCError(.unavailable, "cannot connect to \(host):\(port): \(error)"))
        }
    }

    /// `future`'s connection, or DEADLINE_EXCEEDED at `deadline`, or CANCELLED when the task
    /// is cancelled; whichever comes first. The future itself is left to complete.
    private static func wait(for future: EventLoopFuture<ClientConnection>,
                             until deadline: ContinuousClock.Instant?) async throws -> ClientConnection {
        guard let deadline else { return try await future.get() }
        let loop = future.eventLoop
        let waiter = loop.makePromise(of: ClientConnection.self)
        future.cascade(to: waiter)
        let remaining = ContinuousClock.now.duration(to: deadline)
        let timer = loop.scheduleTask(in: .nanoseconds(max(0, remaining.nanoseconds))) {
            waiter.fail(RPCError(.deadlineExceeded, "deadline exceeded while connecting"))
        }
        waiter.futureResult.whenComplete { _ in timer.cancel() }
        return try await withTaskCancellationHandler {
            try await waiter.futureResult.get()
        } onCancel: {
            waiter.fail(RPCError(.cancelled, "call cancelled while connecting"))
        }
    }

    private func openConnection() -> EventLoopFuture<ClientConnection> {
        let maxMessageSize = configuration.maxMessageSize, firstStreamID = configuration.firstStreamID
        return ClientBootstrap(group: eventLoop)
            .connectTimeout(.nanoseconds(configuration.connectTimeout.nanoseconds))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let pipeline = channel.pipeline.syncOperations
                    try pipeline.addHandler(ByteToMessageHandler(TTRPCFrameDecoder(maxPayloadSize: maxMessageSize)))
                    try pipeline.addHandler(MessageToByteHandler(TTRPCFrameEncoder()))
                    try pipeline.addHandler(ClientCallHandler(firstStreamID: firstStreamID))
                }
            }
            .connect(host: host, port: port)
            .map { ClientConnection(channel: $0) }
    }
}

/// One open connection of a client.
final class ClientConnection: Sendable {
    let channel: any Channel
    private let exhausted = Atomic<Bool>(false)

    init(channel: any Channel) { self.channel = channel }

    /// True once the stream ids of this connection are used up, or the server is draining
    /// it: a new connection is opened.
    var isExhausted: Bool { exhausted.load(ordering: .relaxed) }

    /// No new call goes on this connection (its calls in flight still finish).
    func retire() { exhausted.store(true, ordering: .relaxed) }

    func send(_ envelope: [UInt8], deadline: ContinuousClock.Instant?) async -> Result<TTRPC.Response, RPCError> {
        let promise = channel.eventLoop.makePromise(of: ByteBuffer.self)
        let call = ClientCallHandler.Call(payload: envelope, deadline: deadline, promise: promise,
                                          onExhausted: { [self] in self.exhausted.store(true, ordering: .relaxed) })
        channel.writeAndFlush(call).whenFailure { error in
            promise.fail(RPCError(.unavailable, "connection lost: \(error)"))
        }
        let payload: ByteBuffer
        do {
            payload = try await withTaskCancellationHandler {
                try await promise.futureResult.get()
            } onCancel: {
                promise.fail(RPCError(.cancelled, "call cancelled"))
            }
        } catch {
            return .failure(error as? RPCError ?? RPCError(.unavailable, "connection lost: \(error)"))
        }
        do {
            return .success(try TTRPC.Response(serializedBytes: payload.readableBytesView))
        } catch {
            return .failure(RPCError(.internal, "unmarshal response error: \(error)"))
        }
    }
}

/// Allocates stream ids (odd, increasing), matches responses to calls and enforces deadlines.
final class ClientCallHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = InboundFrame
    typealias OutboundIn = Call
    typealias OutboundOut = OutboundFrame

    struct Call {
        var payload: [UInt8]
        var deadline: ContinuousClock.Instant?
        var promise: EventLoopPromise<ByteBuffer>
        var onExhausted: @Sendable () -> Void
    }

    /// A call's failure when the connection has no stream id left for it (it was not sent).
    static let exhaustedMessage = "stream ids of this connection are exhausted"

    private var nextStreamID: UInt32
    private var pending: [UInt32: EventLoopPromise<ByteBuffer>] = [:]
    /// The deadlines of the calls in `pending`, behind one timer.
    private var deadlines = DeadlineQueue()
    private var flushScheduled = false

    /// Set once the stream ids ran out: the connection closes when its last call is answered.
    private var exhausted = false
    private var channel: (any Channel)?

    init(firstStreamID: UInt32 = 1) {
        nextStreamID = firstStreamID
    }

    func handlerAdded(context: ChannelHandlerContext) {
        channel = context.channel
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        channel = nil
    }

    /// Closes a connection whose stream ids ran out once no call waits on it (new calls go on
    /// a new connection; without this it stayed open until the server's idle timeout).
    private func closeIfSpent() {
        if exhausted && pending.isEmpty { channel?.close(promise: nil) }
    }

    /// Coalesces flushes: calls sent from other threads arrive as separate event-loop tasks,
    /// each asking for a flush; the requests written until the loop gets to the flush go
    /// out in one syscall.
    func flush(context: ChannelHandlerContext) {
        guard !flushScheduled else { return }
        flushScheduled = true
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.eventLoop.execute {
            handler.value.flushScheduled = false
            boundContext.value.flush()
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise writePromise: EventLoopPromise<Void>?) {
        let call = unwrapOutboundIn(data)
        guard nextStreamID < UInt32.max - 1 else {
            call.onExhausted()
            call.promise.fail(RPCError(.unavailable, Self.exhaustedMessage))
            writePromise?.succeed(())
            exhausted = true
            closeIfSpent()
            return
        }
        let streamID = nextStreamID
        nextStreamID += 2
        pending[streamID] = call.promise
        if let deadline = call.deadline {
            // The server answers at the same moment; this covers a server that does not.
            deadlines.add(streamID, deadline: deadline)
            armDeadlines(context.eventLoop)
        }
        call.promise.futureResult.whenFailure { [loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)] _ in
            // Cancelled or timed out: forget the stream; a late answer is dropped.
            loopBound.value.pending.removeValue(forKey: streamID)
            loopBound.value.closeIfSpent()
        }
        context.write(wrapOutboundOut(OutboundFrame(streamID: streamID, kind: .request, payload: call.payload)),
                      promise: writePromise)
    }

    private func armDeadlines(_ loop: any EventLoop) {
        let handler = NIOLoopBound(self, eventLoop: loop)
        deadlines.arm(on: loop) {
            let this = handler.value
            this.deadlines.fired()
            for streamID in this.deadlines.popDue(now: .now) {
                this.pending.removeValue(forKey: streamID)?.fail(RPCError(.deadlineExceeded, "deadline exceeded"))
            }
            this.closeIfSpent()
            this.armDeadlines(loop)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .frame(let header, let payload):
            guard header.kind == .response, let promise = pending.removeValue(forKey: header.streamID) else { return }
            deadlines.dropFinished(pending: pending.count) { pending[$0] != nil }
            promise.succeed(payload)
            closeIfSpent()
        case .oversize(let header):
            guard let promise = pending.removeValue(forKey: header.streamID) else { return }
            deadlines.dropFinished(pending: pending.count) { pending[$0] != nil }
            promise.fail(RPCError(.resourceExhausted, "response length \(header.length) exceeds the maximum message size"))
            closeIfSpent()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        failAll(RPCError(.unavailable, "connection closed by the server"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        failAll(RPCError(.unavailable, "connection failed: \(error)"))
        context.close(promise: nil)
    }

    private func failAll(_ error: RPCError) {
        let entries = pending
        pending = [:]
        deadlines.removeAll()
        for (_, promise) in entries { promise.fail(error) }
    }
}

extension TTRPC.Request {
    /// A call of `method` (its deadline, `timeoutNano`, set by the caller).
    public init(_ method: any AnyMethodDescriptor, payload: [UInt8], metadata: [TTRPC.KeyValue]) {
        self.init()
        service = method.service
        self.method = method.method
        self.payload = payload
        self.metadata = metadata
    }
}
