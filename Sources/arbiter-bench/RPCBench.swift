import ArgumentParser
import Contracts
import Foundation
import LoadTest
import RPC

/// The RPC layer alone: the cost of a call through Arbiter's client and server, both in this
/// process, with a handler that does almost nothing. Every Decide pays it twice (the load
/// generator's call and the decision service's profile call), on a machine whose CPU the
/// suite's latency waits for; CPU per call is the figure to compare builds by.
struct RPCBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rpc",
        abstract: "grpc.health.v1.Health/Check over loopback, client and server in this process: calls/s, latency and CPU per call (both sides).")

    @Option(help: "Calls/s, open loop (0: closed loop, as fast as it goes).") var rate = 5000.0
    @Option(help: "Seconds to measure (after a 2 s warm-up).") var duration = 10.0
    @Option(help: "Calls in flight at most.") var concurrency = 64
    @Option(help: "Connections (calls are spread over them).") var connections = 4

    func validate() throws {
        guard rate >= 0, duration > 0, concurrency >= 1, connections >= 1 else {
            throw ValidationError("--rate must be ≥ 0, --duration > 0, --concurrency and --connections ≥ 1")
        }
    }

    func run() async throws {
        // On the event loop, as Decide and GetProfile are served.
        let (serverTask, port) = try await Bench.serve(HealthService(), handlerExecution: .eventLoop)
        defer { serverTask.cancel() }
        let clients = Bench.loadClients(connections, port: port)
        defer { clients.forEach { $0.close() } }
        let target = rate > 0 ? rate : nil
        let check: @Sendable (RPCClient, Int) async throws -> String = { client, _ in
            _ = try await client.call(HealthV1.Health.check, HealthV1.HealthCheckRequest(), timeout: .seconds(5))
            return "Health/Check"
        }
        _ = try await LoadTest.run(clients, seconds: 2, concurrency: concurrency, rate: target, check)
        let before = ProcessCPU.now()
        let result = try await LoadTest.run(clients, seconds: duration, concurrency: concurrency, rate: target, check)
        let cpu = ProcessCPU.now().seconds - before.seconds
        let calls = Double(result.total.totalCount)
        print("Health/Check (\(target.map { String(format: "open loop at %.0f/s", $0) } ?? "closed loop"), \(concurrency) in flight at most, \(connections) connections): "
              + LoadTest.Result.line(result.total, seconds: result.seconds) + ", errors \(result.errors.values.reduce(0, +))")
        print(String(format: "CPU per call (client and server, user + system): %.1f us; the process used %.0f %% of a core",
                     cpu / max(calls, 1) * 1e6, cpu / result.seconds * 100))
        if let line = result.hostCPULine { print(line) }
    }
}

/// This process's CPU time so far (user + system, every thread).
enum ProcessCPU {
    struct Reading { var seconds: Double }
    static func now() -> Reading {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        func seconds(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
        return Reading(seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime))
    }
}
