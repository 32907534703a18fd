import Contracts
import EchoService
import Logging
import NIOCore
import NIOPosix
import RPC
import Synchronization
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Methods that exercise the runtime, on the message types of the echo service.
enum TestMethods {
    static let service = "test.v1.Test"
    /// Waits until the gate opens; counts how many calls have started.
    static let block = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "Block", isIdempotent: false)
    /// Throws an error that is not an RPCError.
    static let crash = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "Crash", isIdempotent: false)
    /// Answers UNAVAILABLE to its first `message` (as a number) calls.
    static let flaky = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "Flaky", isIdempotent: true)
    static let flakyUnsafe = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "FlakyUnsafe", isIdempotent: false)
    /// Calls Echo on `relayTarget` without a timeout of its own: the deadline propagates.
    static let relay = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "Relay", isIdempotent: false)
    /// Waits `delay_ms` for something that ignores cancellation (a detached task).
    static let stubborn = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "Stubborn", isIdempotent: false)
    /// Answer "loop" or "pool": where the handler ran. Registered with the server's default
    /// execution, with `.eventLoop` and with `.concurrentPool`.
    static let whereDefault = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "WhereDefault", isIdempotent: true)
    static let whereLoop = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "WhereLoop", isIdempotent: true)
    static let wherePool = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "WherePool", isIdempotent: true)
    /// On the loop, then moved off it for a part that would block: "loop-pool".
    static let whereMoved = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "WhereMoved", isIdempotent: true)
    /// Answers a message of `message` (as a number) bytes; counts the calls answered.
    static let large = MethodDescriptor<EchoV1.EchoRequest, EchoV1.EchoResponse>(service: service, method: "Large", isIdempotent: true)
}

struct Boom: Error {}

final class TestService: RPCService {
    let started = Atomic<Int>(0)
    let cancelled = Atomic<Int>(0)
    let flakyCalls = Atomic<Int>(0)
    let largeAnswered = Atomic<Int>(0)
    let gate = Gate()
    let relayTarget = Mutex<RPCClient?>(nil)

    func register(in router: inout RPCRouter) {
        router.register(TestMethods.block) { [self] request, _ in
            started.add(1, ordering: .relaxed)
            do {
                try await gate.wait()
            } catch {
                cancelled.add(1, ordering: .relaxed)
                throw error
            }
            var response = EchoV1.EchoResponse()
            response.message = request.message
            return response
        }
        router.register(TestMethods.crash) { _, _ in throw Boom() }
        let flaky: @Sendable (EchoV1.EchoRequest, RPCContext) async throws -> EchoV1.EchoResponse = { [self] request, _ in
            let n = flakyCalls.add(1, ordering: .relaxed).newValue
            if n <= Int(request.message) ?? 0 { throw RPCError(.unavailable, "try again") }
            var response = EchoV1.EchoResponse()
            response.message = "after \(n)"
            return response
        }
        router.register(TestMethods.flaky, flaky)
        router.register(TestMethods.flakyUnsafe, flaky)
        router.register(TestMethods.relay) { [self] request, _ in
            let client = relayTarget.withLock { $0 }!
            var echo = EchoV1.EchoRequest()
            echo.message = request.message
            return try await client.call(EchoV1.Echo.echo, echo)
        }
        let whereRun: @Sendable (EchoV1.EchoRequest, RPCContext) async throws -> EchoV1.EchoResponse = { _, _ in
            var response = EchoV1.EchoResponse()
            response.message = MultiThreadedEventLoopGroup.currentEventLoop == nil ? "pool" : "loop"
            return response
        }
        router.register(TestMethods.whereDefault, whereRun)
        router.register(TestMethods.whereLoop, execution: .eventLoop, whereRun)
        router.register(TestMethods.wherePool, execution: .concurrentPool, whereRun)
        router.register(TestMethods.whereMoved, execution: .eventLoop) { _, _ in
            func here() -> String { MultiThreadedEventLoopGroup.currentEventLoop == nil ? "pool" : "loop" }
            let before = here()
            let moved = await withTaskExecutorPreference(globalConcurrentExecutor) { here() }
            var response = EchoV1.EchoResponse()
            response.message = "\(before)-\(moved)"
            return response
        }
        router.register(TestMethods.large) { [self] request, _ in
            var response = EchoV1.EchoResponse()
            response.message = String(repeating: "x", count: Int(request.message) ?? 0)
            largeAnswered.add(1, ordering: .relaxed)
            return response
        }
        router.register(TestMethods.stubborn) { request, _ in
            await Task.detached { try? await Task.sleep(for: .milliseconds(request.delayMs)) }.value
            return EchoV1.EchoResponse()
        }
    }
}

/// A gate handlers wait on until the test opens it; a cancelled waiter leaves with CancellationError.
final class Gate: Sendable {
    private struct State {
        var open = false
        var waiters: [Int: CheckedContinuation<Void, any Error>] = [:]
        var next = 0
    }
    private let state = Mutex(State())

    func wait() async throws {
        let id = state.withLock { state in
            state.next += 1
            return state.next
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let resume: Result<Void, any Error>? = state.withLock { state in
                    if state.open { return .success(()) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    state.waiters[id] = continuation
                    return nil
                }
                if let resume { continuation.resume(with: resume) }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume(throwing: CancellationError())
        }
    }

    func open() {
        let waiters = state.withLock { state in
            state.open = true
            defer { state.waiters = [:] }
            return Array(state.waiters.values)
        }
        waiters.forEach { $0.resume() }
    }
}

/// Runs a server with Health, Echo and `services` on a free loopback port for the duration of `body`.
func withServer<T: Sendable>(
    configure: (inout RPCServerConfiguration) -> Void = { _ in },
    services: [any RPCService] = [],
    _ body: @Sendable (RPCServer, Int) async throws -> T
) async throws -> T {
    try await withRPCServer(configure: configure, services: [HealthService(services: [EchoV1.Echo.name]), EchoService()] + services, body)
}

func makeClient(_ port: Int, token: String? = nil, configure: (inout RPCClientConfiguration) -> Void = { _ in }) -> RPCClient {
    var configuration = RPCClientConfiguration.withToken(token)
    configure(&configuration)
    return RPCClient(host: "127.0.0.1", port: port, configuration: configuration)
}

/// A raw TCP connection for wire-level tests: send any bytes, read whole frames.
final class RawConnection {
    let channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>
    private var inbound: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator
    private var pending = ByteBuffer()

    /// `receiveBuffer`: the socket's receive buffer in bytes (the kernel's default, which
    /// grows with the traffic, when nil).
    init(port: Int, receiveBuffer: Int? = nil) async throws {
        var bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        if let receiveBuffer { bootstrap = bootstrap.channelOption(.socketOption(.so_rcvbuf), value: .init(receiveBuffer)) }
        channel = try await bootstrap
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        inbound = channel.inbound.makeAsyncIterator()
    }

    func send(_ bytes: [UInt8]) async throws {
        try await channel.outbound.write(ByteBuffer(bytes: bytes))
    }

    static func frame(stream: UInt32, type: UInt8 = 1, payload: [UInt8], declaredLength: UInt32? = nil) -> [UInt8] {
        var buffer = ByteBuffer()
        buffer.writeInteger(declaredLength ?? UInt32(payload.count))
        buffer.writeInteger(stream)
        buffer.writeInteger(type)
        buffer.writeInteger(UInt8(0))
        buffer.writeBytes(payload)
        return Array(buffer.readableBytesView)
    }

    static func request<I: ProtoMessage>(service: String, method: String, _ message: I, timeoutNano: Int64 = 0,
                                         metadata: [(String, String)] = []) -> [UInt8] {
        var request = TTRPC.Request()
        request.service = service
        request.method = method
        request.payload = message.serializedBytes()
        request.timeoutNano = timeoutNano
        request.metadata = metadata.map {
            var kv = TTRPC.KeyValue()
            kv.key = $0.0
            kv.value = $0.1
            return kv
        }
        return request.serializedBytes()
    }

    /// The next frame, or nil when the server closed the connection.
    func readFrame() async throws -> (header: FrameHeader, response: TTRPC.Response)? {
        while true {
            let parsed = { (buffer: inout ByteBuffer) -> (FrameHeader, [UInt8])? in
                guard buffer.readableBytes >= 10,
                      let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self),
                      buffer.readableBytes >= 10 + Int(length) else { return nil }
                _ = buffer.readInteger(as: UInt32.self)
                let stream = buffer.readInteger(as: UInt32.self)!
                let type = buffer.readInteger(as: UInt8.self)!
                _ = buffer.readInteger(as: UInt8.self)
                let payload = buffer.readBytes(length: Int(length))!
                return (FrameHeader(length: length, streamID: stream, kind: .init(rawValue: type)), payload)
            }(&pending)
            if let (header, payload) = parsed {
                return (header, try TTRPC.Response(serializedBytes: payload))
            }
            guard var chunk = try await inbound.next() else { return nil }
            pending.writeBuffer(&chunk)
        }
    }

    /// True when the server closed (or reset) the connection instead of answering.
    func isClosedByServer() async -> Bool {
        do { return try await readFrame() == nil } catch { return true }
    }

    func close() async {
        channel.outbound.finish()
        try? await channel.channel.close()
    }

    deinit {
        channel.outbound.finish()
        channel.channel.close(promise: nil)
    }
}

/// A port whose connects hang, as to a host that drops SYNs: a socket listening with a
/// backlog of 0 that does not accept, its queue filled by a connection of its own (Linux then
/// drops further SYNs; a connect sends its SYN again after 1 s, then 3 s). With more than one
/// filler, the others hang too, and take the queue first once it frees. `close` releases the
/// sockets.
final class HeldListener: Sendable {
    let port: Int
    private let listener: Int32
    private let fillers: [Int32]
    private let closed = Atomic<Bool>(false)

    init(fillers: Int = 4) throws {
        #if canImport(Glibc)
        struct Failed: Error { var step: String }
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        // A server may take the port once this is closed (the sockets it accepted inherit it).
        var reuse: Int32 = 1
        _ = setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &reuse, socklen_t(MemoryLayout<Int32>.size))
        guard listener >= 0, Self.call({ bind(listener, $0, $1) }, Self.address(0)) == 0, listen(listener, 0) == 0 else {
            throw Failed(step: "listen")
        }
        _ = fcntl(listener, F_SETFL, O_NONBLOCK)
        var bound = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
        let port = UInt16(bigEndian: bound.sin_port)
        self.listener = listener
        self.port = Int(port)
        self.fillers = (0..<fillers).map { _ in  // non-blocking: the first fills the queue, the others hang in SYN_SENT
            let filler = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            _ = fcntl(filler, F_SETFL, O_NONBLOCK)
            _ = Self.call({ connect(filler, $0, $1) }, Self.address(port))
            return filler
        }
        #else
        struct Unsupported: Error {}
        throw Unsupported()
        #endif
    }

    /// Accepts the connection first in the queue and resets it after `holding` (the queue then
    /// takes the next SYN); false if none came within `patience`. Blocks: call it off the pool.
    func acceptAndClose(within patience: Duration, holding: Duration = .zero) -> Bool {
        let end = ContinuousClock.now + patience
        repeat {
            let accepted = accept(listener, nil, nil)
            if accepted >= 0 {
                if holding > .zero { usleep(UInt32(holding / .microseconds(1))) }
                // Reset, not a FIN: nothing of it lingers on the port.
                var abort = linger(l_onoff: 1, l_linger: 0)
                _ = setsockopt(accepted, SOL_SOCKET, SO_LINGER, &abort, socklen_t(MemoryLayout<linger>.size))
                _ = Glibc.close(accepted)
                return true
            }
            usleep(10_000)
        } while ContinuousClock.now < end
        return false
    }

    /// Closes the sockets, once (a second call does nothing: their numbers may be reused).
    func close() {
        guard !closed.exchange(true, ordering: .relaxed) else { return }
        for socket in [listener] + fillers { _ = Glibc.close(socket) }
    }

    private static func address(_ port: UInt16) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        return address
    }

    private static func call(_ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32, _ address: sockaddr_in) -> Int32 {
        withUnsafePointer(to: address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    }
}
