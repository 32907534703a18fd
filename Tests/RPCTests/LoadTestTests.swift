import Contracts
@testable import LoadTest
import NIOCore
import NIOPosix
import RPC
import Synchronization
import TestSupport
import Testing

@Suite("load generator")
struct LoadTestTests {
    @Test("steal and busy time: the host's share and the machine's own work between two readings of /proc/stat")
    func hostSteal() throws {
        let before = try #require(HostCPU(procStat: "cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\nintr 1\n"))
        #expect(before == HostCPU(total: 1000, steal: 35, idle: 810))
        let after = try #require(HostCPU(procStat: "cpu  400 0 150 1200 10 0 5 235 0 0\n"))
        // 1,000 ticks passed: 200 stolen, 400 idle, 400 (300 user, 100 system) the machine's own work.
        #expect(before.stealPercent(until: after) == 20)
        #expect(before.busyPercent(until: after) == 40)
        #expect(after.stealPercent(until: before) == nil && before.stealPercent(until: before) == nil)
        #expect(after.busyPercent(until: before) == nil && before.busyPercent(until: before) == nil)
        #expect(HostCPU(procStat: "cpu  1 2 3 4 5 6 7\n") == nil)  // no steal column
        #expect(HostCPU(procStat: "intr 1\n") == nil)
        #if os(Linux)
        let now = try #require(HostCPU.now())
        #expect(now.total > 0 && now.steal + now.idle <= now.total)
        #endif
    }

    @Test("open loop: calls at their intended times, failures counted, how late each started reported; closed loop: none")
    func openAndClosedLoopTimed() async throws {
        try await withServer { _, port in
            let client = makeClient(port)
            defer { client.close() }
            // 8 workers at 400/s for 1 s: 50 intended starts each, 20 ms apart.
            let open = try await LoadTest.run([client], seconds: 1, concurrency: 8, rate: 400) { client, i in
                _ = try await client.call(EchoV1.Echo.echo, echoRequest("load", failCode: i % 10 == 0 ? 5 : 0))
                return "Echo"
            }
            // Every intended call, however late a loaded machine starts it.
            #expect(open.total.totalCount == 400, "\(open.total.totalCount) calls")
            #expect(open.errors.values.reduce(0, +) == Int(open.histograms["error"]?.totalCount ?? 0))
            #expect(open.errors.keys.allSatisfy { $0 == "NOT_FOUND" }, "\(open.errors)")
            #expect(open.lateness.totalCount == open.total.totalCount)
            #expect(open.latenessLine != nil && open.json["start_lateness"] != nil)
            #if os(Linux)
            // Linux has /proc/stat: the run reports the host's steal time over it.
            #expect(open.hostStealPercent.map { (0...100).contains($0) } == true && open.json["host_steal_percent"] != nil)
            #expect(open.hostBusyPercent.map { (0...100).contains($0) } == true && open.json["host_busy_percent"] != nil)
            #expect(open.hostCPULine?.hasPrefix("host steal time during the run: ") == true)
            #expect(open.hostCPULine?.contains("busy (its own work, this generator's included): ") == true)
            #endif
            // A call's latency counts from its intended start, so it is never below the lateness.
            #expect(open.total.max >= open.lateness.max)

            let closed = try await LoadTest.run([client], seconds: 0.3, concurrency: 4) { client, _ in
                _ = try await client.call(EchoV1.Echo.echo, echoRequest("load"))
                return "Echo"
            }
            #expect(closed.total.totalCount > 0 && closed.errors.isEmpty)
            #expect(closed.lateness.totalCount == 0 && closed.latenessLine == nil && closed.json["start_lateness"] == nil)
        }
    }

    @Test("open loop: calls a stall at the end holds back past the run's end are still made and counted, the slowest of all")
    func stallAtTheEndCountedTimed() async throws {
        try await withServer { _, port in
            let client = makeClient(port)
            defer { client.close() }
            // 400/s with 8 workers: call i is meant for i × 2.5 ms. From 0.8 s on, each call
            // takes 300 ms, so each worker ends its first slow call past the run's end, with
            // its calls meant for 0.82-0.98 s not yet started. (Before, they were dropped.)
            let result = try await LoadTest.run([client], seconds: 1, concurrency: 8, rate: 400) { client, i in
                _ = try await client.call(EchoV1.Echo.echo, echoRequest("load", delayMs: i >= 320 ? 300 : 0))
                return "Echo"
            }
            #expect(result.total.totalCount == 400 && result.errors.isEmpty, "\(result.total.totalCount) calls, \(result.errors)")
            // The last ones waited behind the slow calls: 8 of 80 slow calls in turn per worker.
            #expect(result.total.max >= 1_000_000, "\(result.total.max) us")
            #expect(result.seconds > 1)
        }
    }

    @Test("timeline: a stall shows in the intervals whose calls it delayed, and every call is in one interval")
    func timelineShowsAStallTimed() async throws {
        try await withServer { _, port in
            let client = makeClient(port)
            defer { client.close() }
            // 200/s with 8 workers: call i is meant to start at i × 5 ms. The calls meant for
            // 0.4-0.5 s take 300 ms in the server.
            let result = try await LoadTest.run([client], seconds: 1, concurrency: 8, rate: 200, timeline: true) { client, i in
                _ = try await client.call(EchoV1.Echo.echo, echoRequest("load", delayMs: (80..<100).contains(i) ? 300 : 0))
                return "Echo"
            }
            #expect(result.calls.count == Int(result.total.totalCount))
            let intervals = result.timeline(every: 0.1)
            #expect(intervals.map(\.calls).reduce(0, +) == result.calls.count)
            #expect(intervals.prefix(4).map(\.start) == [0, 0.1, 0.2, 0.3])
            // Every call meant for 0.4-0.5 s took 300 ms (by when calls ended, that interval
            // would hold quick calls); the calls before it did not wait for anything.
            #expect(intervals.count > 4 && intervals[4].p50Us >= 300_000, "\(intervals)")
            #expect(intervals.prefix(4).allSatisfy { $0.calls > 0 && $0.p50Us < 300_000 }, "\(intervals.prefix(4))")
            let lines = LoadTest.Result.csv(intervals).split(separator: "\n")
            #expect(lines.first == "start_s,calls,p50_us,p99_us,max_us" && lines.count == intervals.count + 1)
        }
    }

    @Test("timeline: nearest-rank percentiles per interval, empty intervals listed with zeros")
    func timelineFigures() {
        var result = LoadTest.Result()
        result.seconds = 3
        // 100 calls in the first second with latencies 1…100 ms, none in the second, one in the third.
        result.calls = (1...100).map { (UInt32($0 * 5_000), UInt32($0 * 1_000)) } + [(2_500_000, 7)]
        #expect(result.timeline(every: 1) == [
            .init(start: 0, calls: 100, p50Us: 50_000, p99Us: 99_000, maxUs: 100_000),
            .init(start: 1, calls: 0, p50Us: 0, p99Us: 0, maxUs: 0),
            .init(start: 2, calls: 1, p50Us: 7, p99Us: 7, maxUs: 7),
        ])
        #expect(result.timeline(every: 2).map(\.calls) == [100, 1])
    }

    static func echo(_ request: EchoV1.EchoRequest) -> LoadTest.WireCall {
        LoadTest.WireCall(EchoV1.Echo.echo, payload: request.serializedBytes())
    }

    @Test("drive, open loop: every intended call is made, each failure counted by its code, metadata and deadline sent")
    func driveOpenLoopTimed() async throws {
        try await withServer(configure: { $0.authToken = "s3cret" }) { _, port in
            let answers = Mutex<[EchoV1.EchoResponse]>([])
            let loops = MultiThreadedEventLoopGroup(numberOfThreads: 2)
            defer { loops.shutdownGracefully { _ in } }
            // 400/s for 1 s over 3 connections on 2 loops: 400 intended starts, 2.5 ms apart.
            let open = try await LoadTest.drive(
                host: "127.0.0.1", port: port, connections: 3, group: loops,
                seconds: 1, rate: 400, concurrency: 8, metadata: ["authorization": "Bearer s3cret", "x-load": "yes"],
                timeout: .seconds(7),
                call: { i in Self.echo(echoRequest("load \(i)", failCode: i % 10 == 0 ? 5 : 0)) },
                answered: { call, payload in
                    let response = try! EchoV1.EchoResponse(serializedBytes: payload)
                    answers.withLock { $0.append(response) }
                    return call.method.method
                })
            // A late call still starts (its lateness counts): all 400, the 40 with i % 10 == 0 failed.
            #expect(open.total.totalCount == 400 && open.histograms["Echo"]?.totalCount == 360)
            #expect(open.errors == ["NOT_FOUND": 40] && open.histograms["error"]?.totalCount == 40)
            #expect(open.lateness.totalCount == 400)
            let received = answers.withLock { $0 }
            #expect(Set(received.map(\.message)) == Set((0..<400).filter { $0 % 10 != 0 }.map { "load \($0)" }))
            #expect(received.allSatisfy { $0.metadata.map { "\($0.key)=\($0.value)" } == ["x-load=yes"] })
            // The deadline went with each call: the server saw at most 7 s left.
            #expect(received.allSatisfy { $0.deadlineRemainingNanos > 0 && $0.deadlineRemainingNanos <= 7_000_000_000 })

            // Without the token, every call fails as the server says.
            let refused = try await LoadTest.drive(
                host: "127.0.0.1", port: port, connections: 1, group: MultiThreadedEventLoopGroup.singleton,
                seconds: 0.2, rate: 100, concurrency: 4, call: { _ in Self.echo(echoRequest("x")) }, answered: { _, _ in "Echo" })
            #expect(refused.errors == ["UNAUTHENTICATED": 20] && refused.histograms.keys.sorted() == ["error"])

            // An answer that its reader cannot take (one that does not decode) is a failed call,
            // not a success of another kind.
            struct Undecodable: Error {}
            let undecodable = try await LoadTest.drive(
                host: "127.0.0.1", port: port, connections: 1, group: MultiThreadedEventLoopGroup.singleton,
                seconds: 0.2, rate: 100, concurrency: 4, metadata: ["authorization": "Bearer s3cret"],
                call: { _ in Self.echo(echoRequest("x")) }, answered: { _, _ in throw Undecodable() })
            #expect(undecodable.errors == ["INTERNAL": 20] && undecodable.histograms.keys.sorted() == ["error"])
        }
    }

    @Test("drive: a stall shows in the timeline of the calls it delayed; closed loop keeps its calls in flight")
    func driveTimelineAndClosedLoopTimed() async throws {
        try await withServer { _, port in
            // 200/s: call i is meant to start at i × 5 ms; the calls meant for 0.4-0.5 s take 300 ms.
            let result = try await LoadTest.drive(
                host: "127.0.0.1", port: port, connections: 2, group: MultiThreadedEventLoopGroup.singleton,
                seconds: 1, rate: 200, concurrency: 64, timeline: true,
                call: { i in Self.echo(echoRequest("load", delayMs: (80..<100).contains(i) ? 300 : 0)) },
                answered: { call, _ in call.method.method })
            #expect(result.calls.count == 200 && result.errors.isEmpty)
            let intervals = result.timeline(every: 0.1)
            // The run lasts until the last answer: an 11th interval, empty, may follow.
            #expect(intervals.count >= 10 && intervals.prefix(10).allSatisfy { $0.calls == 20 }, "\(intervals)")
            #expect(intervals[4].p50Us >= 300_000, "\(intervals)")
            #expect(intervals.prefix(4).allSatisfy { $0.p50Us < 300_000 }, "\(intervals.prefix(4))")

            // Closed loop, 4 in flight, each call 20 ms: about 200 calls/s; no lateness.
            let closed = try await LoadTest.drive(
                host: "127.0.0.1", port: port, connections: 1, group: MultiThreadedEventLoopGroup.singleton,
                seconds: 0.5, rate: nil, concurrency: 4,
                call: { _ in Self.echo(echoRequest("load", delayMs: 20)) }, answered: { call, _ in call.method.method })
            #expect(closed.errors.isEmpty && closed.lateness.totalCount == 0)
            // At most 4 × (0.5 s / 20 ms) = 100; a slow machine makes fewer.
            #expect((4...100).contains(closed.total.totalCount), "\(closed.total.totalCount)")
            #expect(closed.total.min >= 20_000)
        }
    }

    @Test("drive: calls a server never answers count as past their deadline after the run; a server gone fails the run")
    func driveUnansweredTimed() async throws {
        let silent = try await silentServer()
        defer { silent.close(promise: nil) }
        let start = ContinuousClock.now
        let result = try await LoadTest.drive(
            host: "127.0.0.1", port: silent.localAddress!.port!, connections: 1, group: MultiThreadedEventLoopGroup.singleton,
            seconds: 0.2, rate: 100, concurrency: 5, timeout: .milliseconds(300),
            call: { _ in Self.echo(echoRequest("x")) }, answered: { _, _ in "Echo" })
        // 5 slots: the first 5 calls went out and were never answered; the other 15 never
        // started. All 20 intended calls count as past their deadline, none is lost.
        #expect(result.errors == ["DEADLINE_EXCEEDED": 20] && result.total.totalCount == 20)
        #expect(result.histograms.keys.sorted() == ["error"] && result.total.min >= 300_000)
        #expect(ContinuousClock.now - start >= .milliseconds(500) && result.seconds >= 0.5)

        // A server that closes a connection once a request arrives on it.
        final class CloseOnRead: ChannelInboundHandler, Sendable {
            typealias InboundIn = ByteBuffer
            func channelRead(context: ChannelHandlerContext, data: NIOAny) { context.close(promise: nil) }
        }
        let closing = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(CloseOnRead()) } }
            .bind(host: "127.0.0.1", port: 0).get()
        defer { closing.close(promise: nil) }
        // Two loops, each losing its connection: the run fails (at once, not after its 2 s).
        let loops = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { loops.shutdownGracefully { _ in } }
        let failing = ContinuousClock.now
        await #expect(throws: RPCError(.unavailable, "every connection of the load generator was closed by the server")) {
            _ = try await LoadTest.drive(
                host: "127.0.0.1", port: closing.localAddress!.port!, connections: 2, group: loops,
                seconds: 2, rate: 100, concurrency: 5, call: { _ in Self.echo(echoRequest("x")) }, answered: { _, _ in "Echo" })
        }
        #expect(ContinuousClock.now - failing < .seconds(2))
    }

    @Test("drive: an event loop whose connections are all closed fails its share of the calls; the other loops' calls go on")
    func driveLosesOneLoopTimed() async throws {
        // A server that answers every request with an empty OK, except on the first connection
        // it accepted, which it closes at its first request.
        final class AnswerOrClose: ChannelInboundHandler, Sendable {
            typealias InboundIn = InboundFrame
            typealias OutboundOut = OutboundFrame
            let close: Bool
            init(close: Bool) { self.close = close }
            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                guard case .frame(let header, _) = unwrapInboundIn(data), !close else { context.close(promise: nil); return }
                var response = TTRPC.Response()
                response.status = GoogleRPC.Status()
                context.writeAndFlush(wrapOutboundOut(OutboundFrame(streamID: header.streamID, kind: .response, payload: response.serializedBytes())),
                                      promise: nil)
            }
        }
        let accepted = Mutex(0)
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                let first = accepted.withLock { count in count += 1; return count == 1 }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(TTRPCFrameDecoder(maxPayloadSize: 1 << 20)))
                    try channel.pipeline.syncOperations.addHandler(MessageToByteHandler(TTRPCFrameEncoder()))
                    try channel.pipeline.syncOperations.addHandler(AnswerOrClose(close: first))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        defer { server.close(promise: nil) }
        let loops = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { loops.shutdownGracefully { _ in } }
        // Two loops of one connection each: one loop loses its only connection at its first call.
        let result = try await LoadTest.drive(
            host: "127.0.0.1", port: server.localAddress!.port!, connections: 2, group: loops,
            seconds: 1, rate: 200, concurrency: 8, call: { _ in Self.echo(echoRequest("x")) }, answered: { _, _ in "Echo" })
        // Every one of the 200 intended calls is counted: the lost loop's 100 as UNAVAILABLE (before,
        // the run failed), the other's answered.
        #expect(result.total.totalCount == 200)
        #expect(result.errors == ["UNAVAILABLE": 100] && result.histograms["Echo"]?.totalCount == 100, "\(result.errors)")

        // Closed loop: the lost loop's callers stop after their first call; the other's go on.
        accepted.withLock { $0 = 0 }
        let closed = try await LoadTest.drive(
            host: "127.0.0.1", port: server.localAddress!.port!, connections: 2, group: loops,
            seconds: 0.5, rate: nil, concurrency: 4, call: { _ in Self.echo(echoRequest("x")) }, answered: { _, _ in "Echo" })
        #expect(closed.errors == ["UNAVAILABLE": 2] && (closed.histograms["Echo"]?.totalCount ?? 0) > 10, "\(closed.errors)")
    }
}
