import ArgumentParser
import Contracts
import DecisionService
import Foundation
import ProfileService
import RPC
import Simulation

/// The decision-quality benchmark: a synthetic population with a hidden truth driven
/// through the real profile and decision services over loopback.
struct SimulationBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate",
        abstract: "Arbiter's policy against random, most-popular, rules-only and highest-value baselines on a synthetic population; LiftReport and EvaluatePolicy against the truth.")

    @Option(help: "Persons (one decision each).") var persons = 20_000
    @Option(help: "Share of persons in the global holdout.") var holdoutShare = 0.05
    @Option(help: "Decisions in flight.") var workers = 8
    @Option(help: "Seed of the world and the draws.") var seed: UInt64 = 1

    func run() async throws {
        let base = NSTemporaryDirectory() + "/arbiter-bench-simulate-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let (profileTask, profilePort) = try await Bench.serve(ProfileService(store: try ProfileStore(directory: base + "/profile")))
        defer { profileTask.cancel() }
        let profile = RPCClient(host: "127.0.0.1", port: profilePort)
        var configuration = DecisionConfiguration()
        configuration.learner.segments = World.stages
        configuration.holdout.share = holdoutShare
        let store = try DecisionStore(directory: base + "/decision", configuration: configuration.learner)
        let (decisionTask, port) = try await Bench.serve(DecisionService(store: store, configuration: configuration, profile: profile))
        defer { decisionTask.cancel() }
        let client = RPCClient(host: "127.0.0.1", port: port)
        defer { client.close(); profile.close() }

        let world = World(persons: persons, seed: seed)
        let simulation = Simulation(world: world, decision: client)
        let seeding = ContinuousClock.now
        try await simulation.seedProfiles(profile)
        try await simulation.seedCatalog()
        print(String(format: "seeded %d persons and %d offers in %.1f s; learner segments %@, holdout %.0f %%", persons, world.offers.count,
                     (ContinuousClock.now - seeding) / .seconds(1), World.stages.joined(separator: ", "), holdoutShare * 100))
        let run = try await simulation.run(0..<persons, workers: workers, seed: seed)
        let measured = try await simulation.measure(run)
        for line in simulation.summary(run, measured) { print(line) }
    }
}
