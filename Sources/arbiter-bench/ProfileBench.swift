import ArgumentParser
import Contracts
import Foundation
import Logging
import ProfileService
import RPC
import Rules
import Synchronization

struct ProfileBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "profile",
        abstract: "Track (batches of 100 events, 10 features defined) and GetProfile against arbiter-profile's service.")

    @Option(help: "Persons the events are spread over.") var persons = 100_000
    @Option(help: "Seconds per measurement.") var duration = 10.0
    @Option(help: "Track calls in flight.") var concurrency = 8
    @Option(help: "Connections (calls are spread over them).") var connections = 4
    @Option(help: "GetProfile rate (calls/s, open loop).") var profileRate = 5000.0
    @Option(help: "Store directory (default: a new temporary directory, removed afterwards).") var dataDir: String?
    @Option(help: "profile.stateFlushPersons (dirty feature states kept in memory before a flush).") var stateFlushPersons = ProfileConfiguration().stateFlushPersons
    @Option(help: "profile.stateCachePersons (clean feature states kept in memory).") var stateCachePersons = ProfileConfiguration().stateCachePersons
    @Option(help: "profile.factsCachePersons (persons whose traits and consent are kept in memory).") var factsCachePersons = ProfileConfiguration().factsCachePersons
    @Option(help: "Events appended to the store's tail before they move to the event table together.") var tailEvents = ProfileStore.defaultTailEvents

    func run() async throws {
        let directory = dataDir ?? NSTemporaryDirectory() + "/arbiter-bench-profile-\(UUID().uuidString)"
        defer { if dataDir == nil { try? FileManager.default.removeItem(atPath: directory) } }
        let store = try ProfileStore(directory: directory, flushThreshold: stateFlushPersons, cachePersons: stateCachePersons,
                                     factsPersons: factsCachePersons, tailEvents: tailEvents)
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        // Ten features over the two event types the benchmark sends.
        let features: [(String, String, ProfileV1.FeatureDefinition.Aggregation, Int64, Int64, String)] = [
            ("views_1h", "view", .count, 3600, 0, ""), ("views_1d", "view", .count, 86_400, 0, ""),
            ("views_7d", "view", .count, 7 * 86_400, 0, ""), ("pages_7d", "view", .distinctCount, 7 * 86_400, 0, "page"),
            ("view_recency", "view", .decayedSum, 0, 86_400, ""), ("purchases_30d", "purchase", .count, 30 * 86_400, 0, ""),
            ("spend_30d", "purchase", .sum, 30 * 86_400, 0, ""), ("last_order", "purchase", .last, 0, 0, ""),
            ("spend_all", "purchase", .sum, 0, 0, ""), ("purchase_recency", "purchase", .decayedSum, 0, 7 * 86_400, ""),
        ]
        for (name, type, aggregation, window, halfLife, property) in features {
            _ = try store.define(.make(name, on: type, aggregation, window: window, halfLife: halfLife, property: property),
                                 backfill: false, nowMs: now)
        }
        let (serverTask, port) = try await Bench.serve(ProfileService(store: store))
        defer { serverTask.cancel() }
        let clients = Bench.loadClients(connections, port: port)
        let persons = self.persons
        let runID = UUID().uuidString.prefix(8)
        // The persons Track's events reached (GetProfile asks for those: an unknown person's
        // NOT_FOUND is cheaper than a profile), marked once per call.
        let reached = Mutex([Bool](repeating: false, count: persons))

        let track = try await Bench.measure("Track (100 events)", clients, duration: duration, concurrency: concurrency) { client, i in
            var request = ProfileV1.TrackRequest()
            // Seeded per call: the system generator makes a getrandom call per number, 200 per request.
            var random = SplitMix64(seed: UInt64(i))
            let who = (0..<100).map { _ in random.int(persons) }
            request.events = (0..<100).map { j in
                var event = ProfileV1.Event()
                event.eventId = "\(runID)-\(i)-\(j)"
                var person = CommonV1.PersonRef()
                person.ref = .personId("p\(who[j])")
                event.person = person
                event.type = j % 5 == 0 ? "purchase" : "view"
                event.occurredAtMs = now - Int64(random.int(7 * 86_400_000))
                event.value = Double(j % 50)
                var page = CommonV1.Field()
                page.name = "page"
                var value = CommonV1.Value()
                value.kind = .stringValue("page\(j % 20)")
                page.value = value
                event.properties = [page]
                return event
            }
            let response = try await client.call(ProfileV1.Profile.track, request, timeout: .seconds(10))
            precondition(response.accepted == 100)
            reached.withLock { for p in who { $0[p] = true } }
        }
        // GetProfile is measured on a settled store: Track's last states written and both
        // WALs checkpointed (otherwise that background work overlaps the first seconds).
        // That work is Track's, deferred: the second figure counts its time too.
        let settling = ContinuousClock.now
        try store.settle()
        let settled = (ContinuousClock.now - settling).inSeconds
        print(String(format: "Track: %.0f events/s (goal 50000); %.0f events/s with the %.2f s that writing the last states and checkpointing took after the run",
                     track * 100, track * 100 * duration / (duration + settled), settled))

        let known = reached.withLock { marks in marks.indices.filter { marks[$0] } }
        guard !known.isEmpty else { throw ValidationError("Track reached no person: nothing to ask GetProfile for") }
        _ = try await Bench.measure("GetProfile", clients, duration: duration, concurrency: 64, rate: profileRate) { client, i in
            var request = ProfileV1.GetProfileRequest()
            var person = CommonV1.PersonRef()
            var random = SplitMix64(seed: UInt64(i))  // as in Track: no system call per number
            person.ref = .personId("p\(known[random.int(known.count)])")
            request.person = person
            // Every answer is a profile: a NOT_FOUND is an error.
            _ = try await client.call(ProfileV1.Profile.getProfile, request, timeout: .seconds(5))
        }
        print("GetProfile goal: p99 <= 2000 us at 5000/s; rss \(rssMiB()) MiB")
        clients.forEach { $0.close() }
    }
}
