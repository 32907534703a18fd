import Contracts
import Histogram
import NIOCore
import NIOPosix
import RPC
import Synchronization

extension LoadTest {
    /// One call for `drive`: a method and its encoded request.
    public struct WireCall: Sendable {
        public var method: any AnyMethodDescriptor
        public var payload: [UInt8]

        public init(_ method: any AnyMethodDescriptor, payload: [UInt8]) {
            self.method = method
            self.payload = payload
        }
    }

    /// Drives `host:port` with calls written straight to the wire: open loop at `rate` calls/s
    /// (latency counted from each call's intended start), or closed loop (`rate` nil) with
    /// `concurrency` calls always in flight. Never more than `concurrency` calls are in flight;
    /// in the open loop a call that finds no free slot starts late, and its lateness counts.
    ///
    /// `run` spends a Swift task, a timer and a promise on every call (about 100 µs of CPU per
    /// Decide, measured); on a machine shared with the services it measures, that is CPU taken
    /// from them. Here each event loop of `group` runs one scheduler: at each wake-up it writes
    /// every call that is due, flushes once per connection, and matches answers by stream id.
    ///
    /// `call(i)` builds call `i` (run on an event loop of `group`); `answered(call, payload)`
    /// names the kind of a call that succeeded (for per-kind figures), from its answer; if it
    /// throws (an answer that does not decode), the call failed with INTERNAL. A call
    /// that fails is counted under its status code (`NOT_FOUND`) in `errors` and as kind
    /// `error`. `timeout` is sent as each call's deadline. A server slower than `rate` makes
    /// the calls start ever later, and the run lasts past `seconds` until they are answered:
    /// `Result.seconds` is then the run's real length. Calls not answered (or, in open loop,
    /// not even started) `timeout` after the run count as `DEADLINE_EXCEEDED`. Every
    /// connection is opened before the run; a lost one fails its calls in flight. An event
    /// loop that has lost all of its connections fails its share of the calls as they come
    /// due (open loop; `UNAVAILABLE`) or stops its callers (closed loop), and the others go
    /// on; the run fails when every connection is lost.
    public static func drive(
        host: String, port: Int, connections: Int, group: any EventLoopGroup,
        seconds: Double, rate: Double?, concurrency: Int, metadata: Metadata = [:],
        timeout: Duration = .seconds(10), timeline: Bool = false,
        call: @escaping @Sendable (Int) -> WireCall,
        answered: @escaping @Sendable (WireCall, [UInt8]) throws -> String
    ) async throws -> Result {
        let loops = Array(group.makeIterator())
        let drivers = max(1, min(loops.count, connections, concurrency))
        let keyValues = metadata.wire  // once, not per call
        let envelope: @Sendable (WireCall) -> [UInt8] = { call in
            var request = TTRPC.Request(call.method, payload: call.payload, metadata: keyValues)
            request.timeoutNano = timeout.nanoseconds
            return request.serializedBytes()
        }
        // One scheduler per event loop, each with its share of the rate, the calls in flight
        // and the connections; scheduler d makes calls d, d + drivers, d + 2 × drivers, …
        let connected = ConnectedSchedulers(drivers)
        var bound: [NIOLoopBound<WireScheduler>] = []
        var channels: [any Channel] = []
        func closeAll() { for channel in channels { channel.close(promise: nil) } }
        for d in 0..<drivers {
            let loop = loops[d]
            let share = (0..<connections).filter { $0 % drivers == d }.count
            let slots = max(1, concurrency / drivers + (d < concurrency % drivers ? 1 : 0))
            let scheduler = try await loop.submit {
                NIOLoopBound(WireScheduler(loop: loop, first: d, stride: drivers, rate: rate, slots: slots, timeline: timeline,
                                           connected: connected, call: call, envelope: envelope, answered: answered),
                             eventLoop: loop)
            }.get()
            for _ in 0..<share {
                do {
                    channels.append(try await ClientBootstrap(group: loop)
                    .channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(TTRPCFrameDecoder(maxPayloadSize: 4 << 20)))
                            try channel.pipeline.syncOperations.addHandler(WireConnection(scheduler: scheduler.value))
                        }
                    }
                    .connect(host: host, port: port).get())
                } catch {
                    closeAll()
                    throw RPCError(.unavailable, "cannot connect to \(host):\(port): \(error)")
                }
            }
            bound.append(scheduler)
        }
        let cpuBefore = HostCPU.now()
        let begin = NIODeadline.now()
        let end = begin + .nanoseconds(Int64(seconds * 1e9))
        let grace = end + .nanoseconds(timeout.nanoseconds)
        var result = Result()
        do {
            try await withThrowingTaskGroup(of: Result.self) { group in
                for scheduler in bound {
                    group.addTask {
                        try await scheduler.eventLoop.flatSubmit {
                            scheduler.value.start(begin: begin, end: end, grace: grace)
                        }.get()
                        return try await scheduler.eventLoop.submit { scheduler.value.finish() }.get()
                    }
                }
                for try await part in group { result.merge(part) }
            }
        } catch {
            closeAll()
            throw error
        }
        result.seconds = max(seconds, Double((NIODeadline.now() - begin).nanoseconds) / 1e9)
        if let cpuBefore, let cpuAfter = HostCPU.now() {
            result.hostStealPercent = cpuBefore.stealPercent(until: cpuAfter)
            result.hostBusyPercent = cpuBefore.busyPercent(until: cpuAfter)
        }
        return result
    }
}

/// How many of a run's schedulers still have a connection.
final class ConnectedSchedulers: Sendable {
    private let count: Atomic<Int>
    init(_ count: Int) { self.count = Atomic(count) }
    /// A scheduler lost its last connection; returns how many still have one.
    func lose() -> Int { count.subtract(1, ordering: .relaxed).newValue }
    var none: Bool { count.load(ordering: .relaxed) <= 0 }
}

/// `LoadTest.drive`'s scheduler for one event loop: starts the calls due, keeps their intended
/// starts by stream id, and records each answer. Used only on its loop.
final class WireScheduler {
    let loop: any EventLoop
    private let stride: Int
    private let intervalNs: Double?
    private let slots: Int
    private let timeline: Bool
    private let connected: ConnectedSchedulers
    private let call: @Sendable (Int) -> LoadTest.WireCall
    private let envelope: @Sendable (LoadTest.WireCall) -> [UInt8]
    private let answered: @Sendable (LoadTest.WireCall, [UInt8]) throws -> String

    private var connections: [WireConnection] = []
    private var next: Int
    private var turn = 0
    private var inFlight = 0
    private var begin = NIODeadline.uptimeNanoseconds(0)
    private var end = NIODeadline.uptimeNanoseconds(0)
    private var grace = NIODeadline.uptimeNanoseconds(0)
    private var starting = false
    private var timer: (task: Scheduled<Void>, at: NIODeadline)?
    private var graceTimer: Scheduled<Void>?
    private var done: EventLoopPromise<Void>?
    private var result = LoadTest.Result()

    init(loop: any EventLoop, first: Int, stride: Int, rate: Double?, slots: Int, timeline: Bool, connected: ConnectedSchedulers,
         call: @escaping @Sendable (Int) -> LoadTest.WireCall,
         envelope: @escaping @Sendable (LoadTest.WireCall) -> [UInt8],
         answered: @escaping @Sendable (LoadTest.WireCall, [UInt8]) throws -> String) {
        self.loop = loop
        self.next = first
        self.stride = stride
        self.intervalNs = rate.map { 1e9 / $0 }
        self.slots = slots
        self.timeline = timeline
        self.connected = connected
        self.call = call
        self.envelope = envelope
        self.answered = answered
    }

    func add(_ connection: WireConnection) {
        connections.append(connection)
    }

    /// Starts the run; the future completes once every call started has been answered (or
    /// given up at `grace`).
    func start(begin: NIODeadline, end: NIODeadline, grace: NIODeadline) -> EventLoopFuture<Void> {
        self.begin = begin
        self.end = end
        self.grace = grace
        let promise = loop.makePromise(of: Void.self)
        starting = true
        done = promise
        let this = NIOLoopBound(self, eventLoop: loop)
        graceTimer = loop.scheduleTask(deadline: grace) { this.value.giveUp() }
        if connections.isEmpty { orphaned() }  // the server closed them before the run
        if starting { pump() } else { finishIfDone() }
        return promise.futureResult
    }

    /// The figures so far; closes the connections.
    func finish() -> LoadTest.Result {
        for connection in connections { connection.close() }
        connections = []
        return result
    }

    /// Starts every call that is due and has a free slot, flushes, and sets the timer for the next.
    private func pump() {
        guard starting else { return }
        let now = NIODeadline.now()
        while inFlight < slots {
            let intended: NIODeadline
            if let intervalNs {
                intended = begin + .nanoseconds(Int64(Double(next) * intervalNs))
                if intended >= end { starting = false; break }
                if intended > now { break }
            } else {
                if now >= end { starting = false; break }
                intended = now
            }
            guard !connections.isEmpty else {
                // Open loop after this loop lost its connections (`lost`): the call due fails,
                // unless every loop lost them, which ends the run.
                guard !connected.none else { failRun(); break }
                record(kind: "error", failure: "\(RPCError.Code.unavailable)", intended: intended)
                next += stride
                continue
            }
            let connection = connections[turn % connections.count]
            turn &+= 1
            let wire = call(next)
            next += stride
            connection.write(envelope(wire), WireConnection.Pending(call: wire, intended: intended))
            inFlight += 1
            if intervalNs != nil { result.lateness.record(LoadTest.Result.micros((now - intended).nanoseconds)) }
        }
        for connection in connections { connection.flush() }  // those with nothing framed skip it
        if starting, intervalNs != nil, inFlight < slots {
            let at = begin + .nanoseconds(Int64(Double(next) * intervalNs!))
            if timer.map({ $0.at > at }) ?? true {
                timer?.task.cancel()
                let this = NIOLoopBound(self, eventLoop: loop)
                timer = (loop.scheduleTask(deadline: at) { this.value.timer = nil; this.value.pump() }, at)
            }
        }
        if !starting { timer?.task.cancel(); timer = nil }
        finishIfDone()
    }

    /// An answer (or a failure) for `streamID` on `connection`.
    func answer(_ call: WireConnection.Pending, _ outcome: Swift.Result<ByteBuffer, RPCError>) {
        var kind = "error"
        var failure: String?
        switch outcome {
        case .success(let bytes):
            do {
                let response = try TTRPC.Response(serializedBytes: bytes.readableBytesView)
                if let status = response.status, status.code != 0 {
                    failure = "\(RPCError.Code(rawValue: status.code))"
                } else {
                    kind = try answered(call.call, response.payload)
                }
            } catch {
                failure = "\(RPCError.Code.internal)"
            }
        case .failure(let error):
            failure = "\(error.code)"
        }
        record(kind: kind, failure: failure, intended: call.intended)
        inFlight -= 1
        if starting { pump() } else { finishIfDone() }
    }

    private func record(kind: String, failure: String?, intended: NIODeadline, at now: NIODeadline = .now()) {
        let latency = LoadTest.Result.micros((now - intended).nanoseconds)
        if let failure { result.errors[failure, default: 0] += 1 }
        _ = result.histograms[kind, default: Histogram<UInt64>(highestTrackableValue: LoadTest.Result.ceiling)].record(latency)
        if timeline {
            result.calls.append((UInt32(clamping: max(0, (intended - begin).nanoseconds / 1000)), UInt32(clamping: latency)))
        }
    }

    /// `connection` is gone: its calls fail; later calls go to the others.
    func lost(_ connection: WireConnection) {
        connections.removeAll { $0 === connection }
        for call in connection.takePending() {
            record(kind: "error", failure: "\(RPCError.Code.unavailable)", intended: call.intended)
            inFlight -= 1
        }
        if connections.isEmpty && starting { orphaned() }
        if starting { pump() } else { finishIfDone() }  // the freed slots take the calls due
    }

    /// This loop has no connection left: unless every loop is in that state (the run fails),
    /// its calls due fail as they come (open loop: `pump`) or its callers stop (closed loop).
    private func orphaned() {
        if connected.lose() == 0 {
            failRun()
        } else if intervalNs == nil {
            starting = false
        }
    }

    /// Every loop lost all of its connections: the run fails.
    private func failRun() {
        starting = false
        done?.fail(RPCError(.unavailable, "every connection of the load generator was closed by the server"))
        done = nil
    }

    /// The run is over and some calls were never answered, or never started (open loop, a
    /// server far slower than the rate): they count as past their deadline.
    private func giveUp() {
        if starting, let intervalNs {
            while true {
                let intended = begin + .nanoseconds(Int64(Double(next) * intervalNs))
                guard intended < end else { break }
                record(kind: "error", failure: "\(RPCError.Code.deadlineExceeded)", intended: intended, at: grace)
                next += stride
            }
        }
        starting = false
        for connection in connections {
            for call in connection.takePending() {
                record(kind: "error", failure: "\(RPCError.Code.deadlineExceeded)", intended: call.intended)
                inFlight -= 1
            }
        }
        finishIfDone()
    }

    private func finishIfDone() {
        guard !starting, inFlight == 0, let done else { return }
        self.done = nil
        graceTimer?.cancel()
        timer?.task.cancel()
        timer = nil
        done.succeed(())
    }
}

/// One connection of `LoadTest.drive`: frames calls into a buffer that `flush` writes at
/// once, and hands answers to its scheduler.
final class WireConnection: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = InboundFrame

    /// A call sent on this connection and not yet answered.
    struct Pending {
        var call: LoadTest.WireCall
        var intended: NIODeadline
    }

    private var pending: [UInt32: Pending] = [:]
    private let scheduler: WireScheduler
    private var context: ChannelHandlerContext?
    private var buffer = ByteBuffer()
    private var nextStreamID: UInt32 = 1

    init(scheduler: WireScheduler) { self.scheduler = scheduler }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        buffer = context.channel.allocator.buffer(capacity: 64 << 10)
    }

    /// Frames `envelope` as a request (sent at the next `flush`).
    func write(_ envelope: [UInt8], _ call: Pending) {
        let streamID = nextStreamID
        nextStreamID &+= 2
        pending[streamID] = call
        try! TTRPCFrameEncoder().encode(data: OutboundFrame(streamID: streamID, kind: .request, payload: envelope), out: &buffer)
    }

    /// The calls not yet answered, forgotten.
    func takePending() -> [Pending] {
        defer { pending = [:] }
        return Array(pending.values)
    }

    /// Sends what `write` framed.
    func flush() {
        guard let context, buffer.readableBytes > 0 else { return }
        context.writeAndFlush(NIOAny(buffer), promise: nil)
        buffer.clear()
    }

    func close() { context?.close(promise: nil) }

    func channelActive(context: ChannelHandlerContext) {
        scheduler.add(self)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .frame(let header, let payload):
            guard header.kind == .response, let call = pending.removeValue(forKey: header.streamID) else { return }
            scheduler.answer(call, .success(payload))
        case .oversize(let header):
            guard let call = pending.removeValue(forKey: header.streamID) else { return }
            scheduler.answer(call, .failure(RPCError(.resourceExhausted, "answer too large")))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.context = nil
        scheduler.lost(self)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
