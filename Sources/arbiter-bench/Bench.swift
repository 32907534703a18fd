import ArgumentParser
import Contracts
import Foundation
import LoadTest
import IdentityService
import ProfileService
import Logging
import NIOCore
import NIOPosix
import RPC
import Rules
import ServiceRuntime

/// Benchmarks that print figures. Each drives a real server over loopback TCP with
/// Arbiter's own client, `--concurrency` calls in flight, closed loop.
@main
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "arbiter-bench", abstract: "Arbiter benchmarks (print throughput and latency percentiles).",
        subcommands: [IdentityBench.self, ProfileBench.self, DecisionBench.self, RoutingBench.self, SimulationBench.self, HealthBench.self, RPCBench.self, CodecBench.self])
}

struct IdentityBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "identity",
        abstract: "Resolve and Link against arbiter-identity's service with a large store.")

    @Option(help: "Identifiers stored before measuring (two per person).") var identifiers = 1_000_000
    @Option(help: "Seconds per measurement.") var duration = 10.0
    @Option(help: "Calls in flight.") var concurrency = 32
    @Option(help: "Connections (calls are spread over them).") var connections = 4
    @Option(help: "Store directory (default: a new temporary directory, removed afterwards).") var dataDir: String?
    @Flag(help: "Run handlers on the event loop instead of the concurrent pool.") var onEventLoop = false
    @Flag(help: "Only seed --data-dir (for a benchmark of the arbiter-identity process with another client).") var seedOnly = false

    func run() async throws {
        let directory = dataDir ?? NSTemporaryDirectory() + "/arbiter-bench-identity-\(UUID().uuidString)"
        defer { if dataDir == nil { try? FileManager.default.removeItem(atPath: directory) } }
        if seedOnly && dataDir == nil { throw ValidationError("--seed-only needs --data-dir") }
        let normalizer = Normalizer(rules: IdentityRules())
        let store = try IdentityStore(directory: directory, normalizer: normalizer)
        let persons = identifiers / 2
        let seedStart = ContinuousClock.now
        try await store.bulkImport((0..<persons).map { i in
            [try normalizer.normalize(type: "email", value: "user\(i)@example.com").get(),
             try normalizer.normalize(type: "cookie_id", value: "cookie-\(i)").get()]
        }, source: "seed", atMs: 1_700_000_000_000)
        print("seeded \(persons * 2) identifiers (\(persons) persons) in \(seedStart.duration(to: .now)); rss \(rssMiB()) MiB")
        if seedOnly { return }

        let (serverTask, port) = try await Bench.serve(IdentityService(store: store), handlerExecution: onEventLoop ? .eventLoop : .concurrentPool)
        defer { serverTask.cancel() }
        let clients = Bench.loadClients(connections, port: port)

        // Resolve: known identifiers, random persons.
        let resolve = try await Bench.measure("Resolve (known identifier)", clients, duration: duration, concurrency: concurrency) { client, i in
            var request = IdentityV1.ResolveRequest()
            var id = CommonV1.Identifier()
            id.type = "email"
            id.value = "user\(Int.random(in: 0..<persons))@example.com"
            request.identifiers = [id]
            let response = try await client.call(IdentityV1.Identity.resolve, request, timeout: .seconds(5))
            precondition(!response.personId.isEmpty)
        }
        // Link: a new device seen with a known email (attach), half of them a second time (idempotent).
        let link = try await Bench.measure("Link (known email + device)", clients, duration: duration, concurrency: concurrency) { client, i in
            var request = IdentityV1.LinkRequest()
            var email = CommonV1.Identifier()
            email.type = "email"
            // Calls 2k and 2k+1 send the same pair: the second is the idempotent repeat.
            var random = SplitMix64(seed: UInt64(i / 2))
            let person = random.int(persons)
            email.value = "user\(person)@example.com"
            var device = CommonV1.Identifier()
            device.type = "device_id"
            device.value = "device-\(person)-\(i / 2)"
            request.identifiers = [email, device]
            request.source = "bench"
            _ = try await client.call(IdentityV1.Identity.link, request, timeout: .seconds(5))
        }
        print("rss after \(rssMiB()) MiB")
        print("summary: resolve \(Int(resolve))/s (goal 20000), link \(Int(link))/s (goal 5000)")
        clients.forEach { $0.close() }
    }

}

struct HealthBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "health", abstract: "grpc.health.v1.Health/Check against a running server, with Arbiter's client.")

    @Option(help: "Server address, host:port.") var address = "127.0.0.1:7100"
    @Option(help: "Seconds to measure.") var duration = 5.0
    @Option(help: "Calls in flight.") var concurrency = 128
    @Option(help: "Connections.") var connections = 16

    func run() async throws {
        let parts = address.split(separator: ":")
        let clients = Bench.loadClients(connections, port: Int(parts[1])!, host: String(parts[0]))
        _ = try await Bench.measure("Health/Check", clients, duration: duration, concurrency: concurrency) { client, _ in
            _ = try await client.call(HealthV1.Health.check, HealthV1.HealthCheckRequest(), timeout: .seconds(5))
        }
        clients.forEach { $0.close() }
    }
}

extension Bench {
    /// The load generator's event loops, apart from the servers' (the singleton group): the
    /// generator's workers run on their client's loop (LoadTest), and on a server's loops they
    /// would delay that server's I/O (the decision bench's profile calls then timed out).
    static let loadGroup = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)

    /// `count` clients of the load generator for `host:port`, on `loadGroup`.
    static func loadClients(_ count: Int, port: Int, host: String = "127.0.0.1") -> [RPCClient] {
        (0..<count).map { _ in RPCClient(host: host, port: port, group: loadGroup) }
    }

    /// Serves `service` on a free loopback port, logging errors only; cancel the task to stop it.
    /// Each server has event loops of its own, as many as a service process has by default
    /// (`defaultEventLoopThreads`), so that a benchmark measures the service as deployed.
    static func serve(_ service: some RPCService, handlerExecution: RPCServerConfiguration.HandlerExecution = .concurrentPool)
        async throws -> (task: Task<Void, any Error>, port: Int) {
        var router = RPCRouter()
        router.register(service)
        var configuration = RPCServerConfiguration()
        configuration.port = 0
        configuration.handlerExecution = handlerExecution
        var logger = Logger(label: "bench")
        logger.logLevel = .error
        let group = MultiThreadedEventLoopGroup(numberOfThreads: defaultEventLoopThreads)
        let server = RPCServer(configuration: configuration, router: router, logger: logger, group: group)
        let task = Task {
            defer { group.shutdownGracefully { _ in } }
            try await server.run()
        }
        return (task, try await server.listeningAddress().port!)
    }

    /// Runs `call` for `duration` seconds with `concurrency` workers (`LoadTest.run`: closed
    /// loop, or open loop at `rate`); prints the figures and returns the calls/s that succeeded.
    static func measure(_ name: String, _ clients: [RPCClient], duration: Double, concurrency: Int, rate: Double? = nil,
                        _ call: @escaping @Sendable (RPCClient, Int) async throws -> Void) async throws -> Double {
        let result = try await LoadTest.run(clients, seconds: duration, concurrency: concurrency, rate: rate) { client, i in
            try await call(client, i)
            return name
        }
        let total = result.total
        print(String(format: "%@: %.0f calls/s succeeded%@, p50 %d us, p99 %d us, p99.9 %d us, max %d us, errors %d (concurrency %d, %d connections)",
                     name, result.succeeded, rate.map { String(format: " (target %.0f/s, open loop)", $0) } ?? "",
                     total.valueAtPercentile(50), total.valueAtPercentile(99), total.valueAtPercentile(99.9), total.max,
                     result.errors.values.reduce(0, +), concurrency, clients.count))
        if let line = result.latenessLine { print("  \(line)") }
        return result.succeeded
    }
}

extension Duration {
    /// In seconds (one read of the components: two reads of a clock can straddle a second).
    var inSeconds: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) / 1e18
    }
}

func rssMiB() -> Int {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return -1 }
    return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) / 1024
}
