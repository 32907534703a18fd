import ArgumentParser
import Contracts
import Foundation
import RPC
import Simulation
import Synchronization

/// `arbiter demo`: a synthetic population through the running suite (`arbiter up`), then
/// a report of what Arbiter did, measured and learned, as text and as an HTML page.
struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Seed a synthetic population and catalog into the running suite, simulate a period of decisions and outcomes, and report.",
        discussion: """
            Needs the four services (`arbiter up`). Persons have hidden response rates per life stage
            that the services never see; the report compares Arbiter's policy with random,
            most-popular, rules-only and highest-value baselines on the same persons and draws,
            LiftReport's lift with the truth's, EvaluatePolicy's estimates with the baselines as run,
            and what the learner chose per life stage with the truth's best. Per-segment learning
            needs the decision service's learner.segments = ["young", "family", "senior"]
            (examples/arbiter.json, which scripts/run.sh passes to `arbiter up`).
            """)

    @Option(help: "Host of the services.") var host = "127.0.0.1"
    @Option(help: "RPC ports are base+1 (identity), +2 (profile), +3 (decision), +4 (routing), as `arbiter up`.") var portBase = 7100
    @Option(help: "Persons in the population (one decision each).") var persons = 6000
    @Option(help: "Seed of the population and the draws.") var seed: UInt64 = 1
    @Option(help: "Calls in flight.") var workers = 8
    @Option(help: "Write the report as an HTML page with charts here.") var html = "arbiter-demo.html"
    @Option(help: "File holding the token sent as authorization: Bearer <token>.") var authTokenFile: String?

    func validate() throws {
        guard persons >= 10, persons <= 1_000_000 else { throw ValidationError("--persons must be between 10 and 1000000") }
        guard workers >= 1 else { throw ValidationError("--workers must be at least 1") }
    }

    func run() async throws {
        let identity = try makeClient("\(host):\(portBase + 1)", tokenFile: authTokenFile)
        let profile = try makeClient("\(host):\(portBase + 2)", tokenFile: authTokenFile)
        let decision = try makeClient("\(host):\(portBase + 3)", tokenFile: authTokenFile)
        defer { [identity, profile, decision].forEach { $0.close() } }
        for (name, client) in [("identity", identity), ("profile", profile), ("decision", decision)] {
            do {
                _ = try await client.call(HealthV1.Health.check, HealthV1.HealthCheckRequest(), timeout: .seconds(3))
            } catch {
                throw ValidationError("the \(name) service does not answer on \(host):\(portBase + (name == "identity" ? 1 : name == "profile" ? 2 : 3)) (\(error)); start the suite with `arbiter up`")
            }
        }
        let world = World(persons: persons, seed: seed)
        var simulation = Simulation(world: world, decision: decision)
        simulation.byIdentifier = true
        let identities = try await simulation.linkIdentities(identity, profile: profile, workers: workers, progress: bar("identities", persons))
        try await simulation.seedProfiles(profile, workers: workers, progress: bar("profiles", persons))
        let events = try await simulation.trackEvents(profile, workers: workers, progress: bar("events", persons))
        try await simulation.seedCatalog()
        say("catalog: \(world.offers.count) offers")
        let run = try await simulation.run(0..<persons, workers: workers, seed: seed, deliverEvery: 4, progress: bar("decisions", persons))
        let measured = try await simulation.measure(run)
        let report = DemoReport(identity: identities, events: events, run: run, measured: measured, summary: simulation.summary(run, measured))
        say("")
        for line in report.text { say(line) }
        try Data(report.html.utf8).write(to: URL(fileURLWithPath: html))
        say("\nwrote \(html)")
    }

    /// A progress bar on standard error for `total` steps.
    func bar(_ label: String, _ total: Int) -> @Sendable (Int) -> Void {
        let shown = Mutex(-1)
        return { done in
            let percent = done * 100 / max(1, total)
            guard shown.withLock({ last in
                guard percent != last else { return false }
                last = percent
                return true
            }) else { return }
            let filled = percent * 30 / 100
            let line = "\r\(label.padding(toLength: 11, withPad: " ", startingAt: 0)) [\(String(repeating: "#", count: filled))\(String(repeating: ".", count: 30 - filled))] \(percent) % (\(done)/\(total))"
            FileHandle.standardError.write(Data((line + (done == total ? "\n" : "")).utf8))
        }
    }
}
