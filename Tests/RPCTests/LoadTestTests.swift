import Contracts
import LoadTest
import RPC
import Testing

@Suite("load generator")
struct LoadTestTests {
    @Test("open loop: calls at their intended times, failures counted, how late each started reported; closed loop: none")
    func openAndClosedLoop() async throws {
        try await withServer { _, port in
            let client = makeClient(port)
            defer { client.close() }
            // 8 workers at 400/s for 1 s: 50 intended starts each, 20 ms apart.
            let open = try await LoadTest.run([client], seconds: 1, concurrency: 8, rate: 400) { client, i in
                _ = try await client.call(EchoV1.Echo.echo, echoRequest("load", failCode: i % 10 == 0 ? 5 : 0))
                return "Echo"
            }
            // Never more than intended; fewer when a loaded machine holds the workers past the end
            // or its 8 workers stay in slow calls (a clean-clone run of every test at once made at most 300).
            #expect(open.total.totalCount > 0 && open.total.totalCount <= 400, "\(open.total.totalCount) calls")
            #expect(open.errors.values.reduce(0, +) == Int(open.histograms["error"]?.totalCount ?? 0))
            #expect(open.errors.keys.allSatisfy { $0 == "NOT_FOUND" }, "\(open.errors)")
            #expect(open.lateness.totalCount == open.total.totalCount)
            #expect(open.latenessLine != nil && open.json["start_lateness"] != nil)
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
}
