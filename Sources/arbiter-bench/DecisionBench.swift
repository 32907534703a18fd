import ArgumentParser
import Contracts
import DecisionService
import Foundation
import Logging
import ProfileService
import RPC
import Rules
import Synchronization

struct DecisionBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decision",
        abstract: "Decide at a constant arrival rate against arbiter-decision's service, which reads arbiter-profile's over loopback.")

    @Option(help: "Known persons (each with traits and consent in the profile store).") var persons = 100_000
    @Option(help: "Actions in the catalog.") var actions = 50
    @Option(help: "Seconds of measurement.") var duration = 60.0
    @Option(help: "Seconds of warm-up at the same rate, not measured.") var warmup = 5.0
    @Option(help: "Decide calls per second (open loop, latency from the intended start).") var rate = 3000.0
    @Option(help: "Calls in flight at most.") var concurrency = 128
    @Option(help: "Connections to the decision service.") var connections = 8

    func run() async throws {
        let base = NSTemporaryDirectory() + "/arbiter-bench-decision-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: base) }

        // The profile service with every person's tier, country and consent, and a segment.
        let profileStore = try ProfileStore(directory: base + "/profile")
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        let seeding = ContinuousClock.now
        let tiers = ["gold", "silver", "bronze"]
        for p in 0..<persons {
            _ = try profileStore.setTraits(person: "p\(p)", [("tier", .string(tiers[p % 3])), ("age", .number(Double(18 + p % 60)))],
                                           source: "bench", updatedAtMs: now)
            try profileStore.setConsent(person: "p\(p)", [
                ProfileStore.Consent(purpose: "marketing", channel: 1, granted: p % 4 != 0, source: "bench", atMs: now),
                ProfileStore.Consent(purpose: "marketing", channel: 3, granted: p % 2 == 0, source: "bench", atMs: now),
            ])
        }
        try profileStore.defineSegment(name: "gold", rule: try Rule("trait.tier == \"gold\""), nowMs: now)
        print(String(format: "seeded %d persons in %.1f s", persons, (ContinuousClock.now - seeding) / .seconds(1)))

        let (profileTask, profilePort) = try await Bench.serve(ProfileService(store: profileStore))
        defer { profileTask.cancel() }
        let profileClient = RPCClient(host: "127.0.0.1", port: profilePort)

        // The catalog: a mix of rules, consent purposes, placements and caps.
        // As the service runs it: the default configuration's history and commit interval.
        let configuration = DecisionConfiguration()
        let store = try DecisionStore(directory: base + "/decision", for: configuration)
        let decision = DecisionService(store: store, configuration: configuration, profile: profileClient)
        for a in 0..<actions {
            var action = DecisionV1.Action()
            action.id = "action-\(a)"
            action.name = "Action \(a)"
            action.value = Double(5 + (a * 37) % 50)
            action.placements = a % 5 == 0 ? ["cart"] : []
            action.channels = a % 2 == 0 ? [.email, .push] : []
            action.consentPurpose = a % 2 == 0 ? "marketing" : ""
            action.eligibility = ["", "trait.age >= 30", "segment.gold", "trait.tier in [\"silver\", \"gold\"]",
                                  "context.device == \"ios\" or trait.age < 40"][a % 5]
            var cap = DecisionV1.Cap()
            cap.scope = .action
            cap.max = 3
            cap.windowSeconds = 7 * 86_400
            action.caps = [cap]
            _ = try store.upsert(try ActionSpec(action), nowMs: now)
        }
        var total = DecisionV1.Cap()
        total.scope = .total
        total.max = 20
        total.windowSeconds = 86_400
        _ = try store.setPolicy([total])

        let (decisionTask, port) = try await Bench.serve(decision)
        defer { decisionTask.cancel() }
        let clients = Bench.loadClients(connections, port: port)
        let persons = self.persons
        let degraded = Counter()
        let decide: @Sendable (RPCClient, Int) async throws -> Void = { client, _ in
            var request = DecisionV1.DecideRequest()
            var ref = CommonV1.PersonRef()
            ref.ref = .personId("p\(Int.random(in: 0..<persons))")
            request.person = ref
            request.placement = Bool.random() ? "home" : "cart"
            request.context = ["device": Bool.random() ? "ios" : "web"]
            request.count = 3
            let response = try await client.call(DecisionV1.Decision.decide, request, timeout: .seconds(5))
            if response.degraded { degraded.add() }
        }
        if warmup > 0 {
            _ = try await Bench.measure("warm-up", clients, duration: warmup, concurrency: concurrency, rate: rate, decide)
        }
        degraded.reset()
        _ = try await Bench.measure("Decide (3 of \(actions) actions)", clients, duration: duration, concurrency: concurrency,
                                    rate: rate, decide)
        print("degraded answers: \(degraded.value); goal: 3000/s for 60 s with p99 <= 10 ms, p99.9 <= 25 ms; rss \(rssMiB()) MiB")
        clients.forEach { $0.close() }
        profileClient.close()
    }
}

/// A count shared by the load generator's tasks.
final class Counter: Sendable {
    private let count = Mutex(0)
    func add() { count.withLock { $0 += 1 } }
    func reset() { count.withLock { $0 = 0 } }
    var value: Int { count.withLock { $0 } }
}
