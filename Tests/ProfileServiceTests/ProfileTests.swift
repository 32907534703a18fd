import Contracts
import Dispatch
import Foundation
import GRDB
import IdentityFeed
@testable import IdentityService
import Logging
@testable import ProfileService
import RPC
import Rules
import Synchronization
import TestSupport
import Testing

let minute: Int64 = 60_000
let hour: Int64 = 3_600_000

func field(_ name: String, _ value: RuleValue) -> CommonV1.Field { CommonV1.Field(name, value) }

func event(_ id: String, _ who: String, _ type: String, at: Int64, value: Double = 0,
           _ properties: [String: RuleValue] = [:]) -> ProfileV1.Event {
    var event = ProfileV1.Event()
    event.eventId = id
    event.person = personRef(who)
    event.type = type
    event.occurredAtMs = at
    event.value = value
    event.properties = properties.sorted { $0.key < $1.key }.map { field($0.key, $0.value) }
    return event
}

func feature(_ name: String, _ type: String, _ aggregation: ProfileV1.FeatureDefinition.Aggregation,
             window: Int64 = 0, halfLife: Int64 = 0, property: String = "", filter: String = "") -> ProfileV1.FeatureDefinition {
    .make(name, on: type, aggregation, window: window, halfLife: halfLife, property: property, filter: filter)
}

/// An identity service on a real loopback server, and a client of it, for the tests that
/// follow its change feed.
func withIdentity<T: Sendable>(clock: TestClock, _ body: @Sendable (IdentityService, RPCClient) async throws -> T) async throws -> T {
    let identity = IdentityService(store: try IdentityStore(directory: temporaryDirectory("identity-test"), normalizer: Normalizer(rules: IdentityRules())),
                                   clock: clock.read)
    return try await withRPCServer(services: [identity]) { _, port in
        let client = RPCClient(host: "127.0.0.1", port: port)
        defer { client.close() }
        return try await body(identity, client)
    }
}

extension ProfileService {
    func track(_ events: [ProfileV1.Event]) async throws -> ProfileV1.TrackResponse {
        var request = ProfileV1.TrackRequest()
        request.events = events
        return try await track(request)
    }

    @discardableResult
    func define(_ definition: ProfileV1.FeatureDefinition, backfill: Bool = false) throws -> ProfileV1.FeatureDefinition {
        var request = ProfileV1.DefineFeatureRequest()
        request.feature = definition
        request.backfill = backfill
        return try defineFeature(request)
    }

    func segment(_ name: String, _ rule: String) throws {
        var request = ProfileV1.DefineSegmentRequest()
        var segment = ProfileV1.SegmentDefinition()
        segment.name = name
        segment.rule = rule
        request.segment = segment
        _ = try defineSegment(request)
    }

    func profile(_ id: String) async throws -> ProfileV1.ProfileView {
        var request = ProfileV1.GetProfileRequest()
        request.person = personRef(id)
        return try await getProfile(request)
    }

    func features(_ id: String) async throws -> [String: Double] {
        Dictionary(uniqueKeysWithValues: try await profile(id).features.map { ($0.name, $0.value) })
    }

    func traits(_ id: String, _ traits: [String: RuleValue], source: String = "crm", at: Int64) async throws -> ProfileV1.SetTraitsResponse {
        var request = ProfileV1.SetTraitsRequest()
        request.person = personRef(id)
        request.traits = traits.sorted { $0.key < $1.key }.map { field($0.key, $0.value) }
        request.source = source
        request.updatedAtMs = at
        return try await setTraits(request)
    }

    func consent(_ id: String, _ purpose: String, _ channel: CommonV1.Channel, _ granted: Bool, at: Int64, source: String = "form") async throws {
        var request = ProfileV1.SetConsentRequest()
        request.person = personRef(id)
        var record = ProfileV1.ConsentRecord()
        record.purpose = purpose
        record.channel = channel
        record.granted = granted
        record.source = source
        record.atMs = at
        request.consents = [record]
        _ = try await setConsent(request)
    }
}

func makeProfile(_ directory: String = temporaryDirectory("profile-test"), clock: TestClock = TestClock(),
                 identity: RPCClient? = nil, flushThreshold: Int = 50_000, cachePersons: Int = 100_000, factsPersons: Int = 100_000,
                 cacheBytes: Int = 512 << 20, factsBytes: Int = 256 << 20,
                 tailEvents: Int = ProfileStore.defaultTailEvents) throws -> ProfileService {
    ProfileService(store: try ProfileStore(directory: directory, flushThreshold: flushThreshold, cachePersons: cachePersons, cacheBytes: cacheBytes,
                                           factsPersons: factsPersons, factsBytes: factsBytes, tailEvents: tailEvents),
                   identity: identity, clock: clock.read)
}

@Suite("profile: events and features")
struct FeatureTests {
    @Test("a replayed event is never counted twice, in one batch or across batches and restarts")
    func idempotentReplay() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let service = try makeProfile(directory, clock: clock)
        try service.define(feature("purchases", "purchase", .count))
        try service.define(feature("spend", "purchase", .sum))
        let now = clock.read()
        let batch = (0..<5).map { event("e\($0)", "p1", "purchase", at: now - Int64($0) * minute, value: 10) }
        let first = try await service.track(batch + [batch[0]])
        #expect(first.accepted == 5 && first.duplicates == 1)
        let again = try await service.track(batch)
        #expect(again.accepted == 0 && again.duplicates == 5)
        let reopened = try makeProfile(directory, clock: clock)
        #expect(try await reopened.track(batch).duplicates == 5)
        #expect(try await reopened.features("p1") == ["purchases": 5, "spend": 50])
    }

    @Test("new events wait in an append-only tail, then move together: replays, merges, backfills and restarts see every event once")
    func eventTail() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let service = try makeProfile(directory, clock: clock, tailEvents: 3)
        let store = service.store
        try service.define(feature("views", "view", .count))
        func rows() throws -> (tail: Int, moved: Int) {
            try store.pool.read { db in
                (try Int.fetchOne(db, sql: "SELECT count(*) FROM event_tail")!, try Int.fetchOne(db, sql: "SELECT count(*) FROM event")!)
            }
        }
        let now = clock.read()
        let first = [event("e1", "p1", "view", at: now), event("e2", "p1", "view", at: now)]
        #expect(try await service.track(first).accepted == 2)
        #expect(try rows() == (2, 0))
        #expect(try await service.track(first).duplicates == 2)  // found in the tail
        // The third event fills the tail: all three move in the same transaction.
        let second = [event("e3", "p1", "view", at: now), event("e2", "p1", "view", at: now)]
        let tracked = try await service.track(second)
        #expect(tracked.accepted == 1 && tracked.duplicates == 1)
        #expect(try rows() == (0, 3))
        #expect(try await service.track(first).duplicates == 2)  // found in `event`
        #expect(try await service.features("p1") == ["views": 3])

        // A merge reads the target's events by person: those still in the tail count too.
        _ = try await service.track([event("e4", "p2", "view", at: now), event("e5", "p2", "view", at: now)])
        #expect(try rows() == (2, 3))
        try store.apply([(1, .merge(target: "p1", sources: ["p2"]))], nowMs: now)
        #expect(try rows() == (0, 5))
        #expect(try await service.features("p1") == ["views": 5])
        // So does a backfill.
        _ = try await service.track([event("e6", "p1", "view", at: now)])
        try service.define(feature("views_again", "view", .count), backfill: true)
        #expect(try await service.features("p1") == ["views": 6, "views_again": 6])

        // A crash with events in the tail and their states not yet written: the next start
        // moves the tail, then recomputes those persons from their events.
        _ = try await service.track([event("e7", "p3", "view", at: now), event("e8", "p1", "view", at: now)])
        #expect(try rows().tail == 2)
        let reopened = try makeProfile(directory, clock: clock, tailEvents: 3)
        #expect(try await reopened.features("p3") == ["views": 1, "views_again": 1])
        #expect(try await reopened.features("p1") == ["views": 7, "views_again": 7])
        #expect(try await reopened.track([event("e7", "p3", "view", at: now), event("e1", "p1", "view", at: now)]).duplicates == 2)
    }

    @Test("feature state is written behind: readers see it at once, a crash loses none of it, a flush writes it")
    func writeBehind() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let service = try makeProfile(directory, clock: clock, flushThreshold: 1000)
        let store = service.store
        try service.define(feature("views", "view", .count))
        try service.define(feature("recent", "view", .decayedSum, halfLife: 3600))
        let now = clock.read()
        for batch in 0..<5 {
            _ = try await service.track((0..<20).map { i in event("w\(batch)-\(i)", "p\(i % 4)", "view", at: now - Int64(i) * minute, value: 1) })
        }
        let before = try await service.features("p1")
        #expect(before["views"] == 25)
        func pending() throws -> Int { try store.pool.read { db in try Int.fetchOne(db, sql: "SELECT count(*) FROM dirty_person") ?? 0 } }
        func filed() throws -> Int { try store.statePool.read { db in try Int.fetchOne(db, sql: "SELECT count(*) FROM person_state") ?? 0 } }
        #expect(try pending() == 4 && filed() == 0)  // in memory, logged once per person, not yet in person_state

        // A crash: the process is gone without a flush; a new store on the files recomputes.
        let reopened = try makeProfile(directory, clock: clock)
        #expect(try await reopened.features("p1") == before)
        #expect(try filed() == 4 && pending() == 0)

        // Recovery works in slices (bounded memory when everyone is logged): 5 persons, slices of 2.
        let slicedDirectory = temporaryDirectory("profile-test")
        let slicedService = try makeProfile(slicedDirectory, clock: clock, flushThreshold: 1000)
        let sliced = slicedService.store
        try slicedService.define(feature("views", "view", .count))
        _ = try await slicedService.track((0..<10).map { i in event("s\(i)", "s\(i % 5)", "view", at: now) })
        try sliced.recoverDirty(nowMs: now, recoverySlice: 2)
        #expect(try await sliced.statePool.read { db in try Int.fetchOne(db, sql: "SELECT count(*) FROM person_state") } == 5)
        #expect(try await sliced.pool.read { db in try Int.fetchOne(db, sql: "SELECT count(*) FROM dirty_person") } == 0)
        let slicedReopened = try makeProfile(slicedDirectory, clock: clock)
        for p in 0..<5 { #expect(try await slicedReopened.features("s\(p)") == ["views": 2]) }

        // A flush writes the states and empties the log; the threshold flushes by itself.
        let flushing = try makeProfile(temporaryDirectory("profile-test"), clock: clock, flushThreshold: 2)
        let small = flushing.store
        try flushing.define(feature("views", "view", .count))
        _ = try await flushing.track([event("a", "x", "view", at: now), event("b", "y", "view", at: now)])
        small.waitForFlush()  // flushes run on their own queue
        func written() throws -> Int { try small.statePool.read { db in try Int.fetchOne(db, sql: "SELECT count(*) FROM person_state") ?? 0 } }
        func logged() throws -> [String] { try small.pool.read { db in try String.fetchAll(db, sql: "SELECT person_id FROM dirty_person ORDER BY seq") } }
        #expect(try written() == 2)
        #expect(small.memory.withLock { $0.dirty.isEmpty })
        #expect(try await flushing.features("x") == ["views": 1])
        // The written persons leave the log with the next write.
        #expect(try Set(logged()) == ["x", "y"])
        _ = try await flushing.track([event("c", "z", "view", at: now)])
        #expect(try logged() == ["z"])
    }

    @Test("a person with more events than one read of the recomputation holds (1,000) gets the same features back after a crash")
    func recomputeInChunks() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let service = try makeProfile(directory, clock: clock, flushThreshold: 100_000)
        // No windows: the store recovers at its start by the wall clock, not the test's.
        for definition in [feature("views", "view", .count), feature("spend", "purchase", .sum), feature("last_spend", "purchase", .last),
                           feature("pages", "view", .distinctCount, property: "page"), feature("recency", "view", .decayedSum, halfLife: 3600)] {
            try service.define(definition)
        }
        let now = clock.read()
        for batch in 0..<25 {
            _ = try await service.track((0..<100).map { i in
                let n = batch * 100 + i
                return n % 4 == 0
                    ? event("h\(n)", "heavy", "purchase", at: now - Int64(n * 7919 % 200_000) * 1000, value: Double(n % 7))
                    : event("h\(n)", "heavy", "view", at: now - Int64(n * 104_729 % 200_000) * 1000, value: 1, ["page": .string("page\(n % 13)")])
            })
        }
        let before = try await service.features("heavy")
        #expect(before["views"] == 1875 && before["pages"] == 13 && before["spend"].map { $0 > 0 } == true)
        // A crash before the state was written: the next start recomputes it from 2,500 events.
        let after = try await makeProfile(directory, clock: clock).features("heavy")
        #expect(Set(after.keys) == Set(before.keys))
        for (name, value) in before { #expect(abs(after[name]! - value) <= 1e-9 * max(1, abs(value)), "\(name): \(value) before, \(after[name]!) after") }
    }

    @Test("events tracked while a flush writes are not lost: a crash at any point recovers every count")
    func trackDuringFlush() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let now = clock.read()
        let service = try makeProfile(directory, clock: clock, flushThreshold: 3, cachePersons: 5)
        let store = service.store
        try service.define(feature("views", "view", .count))
        // 40 concurrent calls of 10 events over 12 persons: flushes start, and run while calls commit.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for call in 0..<40 {
                group.addTask {
                    _ = try await service.track((0..<10).map { i in event("f\(call)-\(i)", "p\((call + i) % 12)", "view", at: now - Int64(i) * minute) })
                }
            }
            try await group.waitForAll()
        }
        var expected: [String: Double] = [:]
        for call in 0..<40 { for i in 0..<10 { expected["p\((call + i) % 12)", default: 0] += 1 } }
        for (person, views) in expected { #expect(try await service.features(person) == ["views": views]) }
        // A crash with states dirty, being written, or written with their log rows pruned by a
        // later write: a store opened on the files counts the same.
        store.waitForFlush()
        _ = try await service.track([event("last", "p0", "view", at: now)])
        expected["p0", default: 0] += 1
        let reopened = try makeProfile(directory, clock: clock)
        for (person, views) in expected { #expect(try await reopened.features(person) == ["views": views]) }
    }

    @Test("a person tracked again while a flush writes their state is logged again: a crash after the flush recovers it")
    func trackWhileFlushing() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let now = clock.read()
        let service = try makeProfile(directory, clock: clock, flushThreshold: 2)
        let store = service.store
        try service.define(feature("views", "view", .count))
        // Hold the flush queue, so the flush the next call starts waits behind this.
        let gate = DispatchSemaphore(value: 0)
        store.flushQueue.async { gate.wait() }
        _ = try await service.track([event("a1", "a", "view", at: now), event("b1", "b", "view", at: now)])
        #expect(store.memory.withLock { $0.flushRunning && $0.flushing.count == 2 })
        _ = try await service.track([event("a2", "a", "view", at: now)])  // "a" is being flushed
        gate.signal()
        store.waitForFlush()
        // The flush's log rows are pruned; "a" at 2 views is only in memory now.
        try await store.pool.writeWithoutTransaction { db in try store.pruneDirtyLog(db) }
        #expect(try await service.features("a") == ["views": 2])
        let reopened = try makeProfile(directory, clock: clock)
        #expect(try await reopened.features("a") == ["views": 2])
        #expect(try await reopened.features("b") == ["views": 1])
    }

    @Test("a store from before the state file moved out opens with every state recomputed from its events")
    func stateFileMigration() async throws {
        let clock = TestClock()
        let now = clock.read()
        // The v2 layout: person_state inside profile.sqlite, here with a stale state (1 view of 3).
        let directory = try storeMigrated(upTo: "v2: write-behind feature state", by: ProfileStore.migrator, file: "profile.sqlite",
                                          prefix: "profile-test") { db in
            try db.execute(sql: "INSERT INTO feature (name, version, definition, defined_at_ms) VALUES ('views', 1, ?, 0)",
                           arguments: [Data(feature("views", "view", .count).serializedBytes())])
            for i in 0..<3 {
                try db.execute(sql: "INSERT INTO event VALUES (?, 'p', 'p', 'view', ?, ?)", arguments: [
                    "e\(i)", now, Data(ProfileStore.encodeEvent(TrackedEvent(eventID: "e\(i)", personID: "p", type: "view", occurredAtMs: now)))])
            }
            var stale = ProfileStoreV1.PersonState()
            stale.events = 1
            try db.execute(sql: "INSERT INTO person_state VALUES ('p', ?)", arguments: [Data(stale.serializedBytes())])
        }
        let store = try ProfileStore(directory: directory)
        #expect(try await ProfileService(store: store, clock: clock.read).features("p") == ["views": 3])
        // The events, rewritten by v8, are still found by id: a replay is a duplicate.
        #expect(try await store.track([TrackedEvent(eventID: "e1", personID: "p", type: "view", occurredAtMs: now)], nowMs: now).outcomes == [.duplicate])
        #expect(try await store.pool.read { db in
            try Int.fetchOne(db, sql: "SELECT count(*) FROM main.sqlite_master WHERE name = 'person_state'")
        } == 0)
        #expect(try await store.statePool.read { db in try Int.fetchOne(db, sql: "SELECT count(*) FROM person_state") } == 1)

        // A lost state file is rebuilt from the events.
        for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: directory + "/profile-state.sqlite" + suffix) }
        #expect(try await makeProfile(directory, clock: clock).features("p") == ["views": 3])
    }

    @Test("a store from before traits and consent kept whose they were opens with each its holder's own, which a merge then keeps")
    func traitOriginMigration() async throws {
        let clock = TestClock()
        let now = clock.read()
        let directory = try storeMigrated(upTo: "v5: persons merged away or erased", by: ProfileStore.migrator, file: "profile.sqlite",
                                          prefix: "profile-test") { db in
            try db.execute(sql: "INSERT INTO trait VALUES ('a', 'tier', ?, 'crm', ?)",
                           arguments: [Data(CommonV1.Value(.string("gold")).serializedBytes()), now])
            try db.execute(sql: "INSERT INTO consent (person_id, purpose, channel, granted, source, at_ms) VALUES ('a', 'marketing', 1, 1, 'form', ?)",
                           arguments: [now])
        }
        let service = try makeProfile(directory, clock: clock)
        #expect(try await service.profile("a").traits.map(\.name) == ["tier"])
        try service.store.apply([(1, .merge(target: "b", sources: ["a"])), (2, .unmerge(survivor: "b", split: "a"))], nowMs: now)
        let a = try await service.profile("a")
        #expect(a.traits.map(\.name) == ["tier"] && a.consent.map(\.granted) == [true])
        await #expect(throws: RPCError.self) { _ = try await service.profile("b") }
    }

    @Test("a feature defined without backfill stays empty of the events received before it, also when a merge or an unmerge recomputes a person from the stored events")
    func definedWithoutBackfillAcrossMerges() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        let before = clock.read()
        _ = try await service.track((0..<3).flatMap { i in ["a", "b"].map { event("\($0)-old-\(i)", $0, "buy", at: before) } })
        clock.advance(seconds: 1)
        try service.define(feature("buys", "buy", .count))
        try service.define(feature("buys_all", "buy", .count), backfill: true)
        // A late event (it occurred before the definition) received after it counts.
        _ = try await service.track([event("a-new", "a", "buy", at: before - 1000)])
        #expect(try await service.features("a") == ["buys": 1, "buys_all": 4])
        try service.store.apply([(1, .merge(target: "a", sources: ["b"]))], nowMs: clock.read())
        // Before, the merge recomputed buys from every stored event: 7.
        #expect(try await service.features("a") == ["buys": 1, "buys_all": 7])
        try service.store.apply([(2, .unmerge(survivor: "a", split: "b"))], nowMs: clock.read())
        #expect(try await service.features("a") == ["buys": 1, "buys_all": 4])
        #expect(try await service.features("b") == ["buys": 0, "buys_all": 3])
    }

    @Test("an event, a trait or a consent dated ahead of the service's clock counts as made when it arrived, also when a merge recomputes the person")
    func futureDatesCountAtArrival() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        try service.define(feature("views_1h", "view", .count, window: 3600))
        try service.define(feature("last_amount", "view", .last))
        try service.define(feature("decayed", "view", .decayedSum, halfLife: 60))
        let now = clock.read()
        let ahead = now + 23 * 3_600_000  // a client's clock a day ahead, as Track accepts
        _ = try await service.track([event("future", "p", "view", at: ahead, value: 100)])
        clock.advance(seconds: 2 * 3600)
        _ = try await service.track([event("genuine", "p", "view", at: clock.read(), value: 5)])
        // Before: views_1h 2 (the future event stayed in the window for a day) and last_amount 100.
        let live = try await service.features("p")
        #expect(live["views_1h"] == 1 && live["last_amount"] == 5, "\(live)")
        #expect(try await service.profile("p").lastSeenMs == clock.read())  // not a day ahead
        // A merge recomputes p from the stored events: the same features (before, the decayed
        // sum took the future event at the merge's time, 100 instead of ~0).
        try service.store.apply([(1, .merge(target: "p", sources: ["nobody"]))], nowMs: clock.read())
        let recomputed = try await service.features("p")
        #expect(recomputed == live, "\(recomputed) against \(live)")
        // A trait dated a day ahead does not make the next real value stale.
        _ = try await service.traits("p", ["tier": .string("gold")], at: clock.read() + 86_000_000)
        clock.advance(seconds: 1)
        let next = try await service.traits("p", ["tier": .string("silver")], at: clock.read())
        let tier = try await service.profile("p").traits.first { $0.name == "tier" }
        #expect(next.stale.isEmpty && tier?.value == CommonV1.Value(.string("silver")), "\(next)")
        // Nor does a grant dated a day ahead outlive a denial made after it arrived.
        try await service.consent("p", "marketing", .email, true, at: clock.read() + 86_000_000)
        clock.advance(seconds: 1)
        try await service.consent("p", "marketing", .email, false, at: clock.read())
        #expect(try await service.profile("p").consent.map(\.granted) == [false])
    }

    @Test("a feature defined without backfill counts exactly the events stored after it, live and recomputed, whatever order the two clocks were read in")
    func definitionAndTrackRace() async throws {
        let service = try makeProfile(clock: TestClock())
        let store = service.store
        let t: Int64 = 1_700_000_000_000
        func event(_ id: String) -> TrackedEvent { TrackedEvent(eventID: id, personID: "p", type: "view", occurredAtMs: t - 60_000) }
        // The features live, or (with a feed position) recomputed from the stored events by a merge.
        func views(recomputedAt seq: Int64? = nil) async throws -> [String: Double] {
            if let seq { try store.apply([(seq, .merge(target: "p", sources: ["nobody"]))], nowMs: t + 10) }
            return try await service.features("p")
        }
        // A Track whose clock read t + 2 is stored before a definition whose clock read t + 1
        // (each waited for the writer): the event was stored first, so it does not count.
        _ = try await store.track([event("before")], nowMs: t + 2)
        _ = try store.define(feature("early", "view", .count), backfill: false, nowMs: t + 1)
        #expect(try await views()["early"] == 0)
        #expect(try await views(recomputedAt: 1)["early"] == 0)  // before: 1 (received t + 2 >= t + 1)
        // A definition whose clock read t + 5 is stored before a Track whose clock read t + 4:
        // the event was stored after it, and counts.
        _ = try store.define(feature("late", "view", .count), backfill: false, nowMs: t + 5)
        _ = try await store.track([event("after")], nowMs: t + 4)
        #expect(try await views() == ["early": 1, "late": 1])
        #expect(try await views(recomputedAt: 2) == ["early": 1, "late": 1])  // before: late 0 (received t + 4 < t + 5)
    }

    @Test("a consent record the same as the pair's newest but given for another person (a merged one) is kept: an unmerge takes the other's away")
    func consentRetryPerOrigin() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        let now = clock.read()
        try await service.consent("a", "marketing", .email, true, at: now - 100)
        try await service.consent("b", "marketing", .email, false, at: now - 10)
        try service.store.apply([(1, .merge(target: "a", sources: ["b"]))], nowMs: now)
        // The same denial, sent for a itself (a CRM sync): not b's, though equal to it.
        try await service.consent("a", "marketing", .email, false, at: now - 10)
        try service.store.apply([(2, .unmerge(survivor: "a", split: "b"))], nowMs: now)
        // Before: skipped as a retry, so the unmerge took the only denial away, and a was granted.
        #expect(try await service.profile("a").consent.map(\.granted) == [false])
        #expect(try await service.profile("b").consent.map(\.granted) == [false])
    }

    @Test("the same definition with backfill again does not redo it; at most 500 features and 500 segments, each still redefinable")
    func definitionLimits() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        let store = service.store
        let now = clock.read()
        _ = try await service.track([event("a1", "a", "view", at: now), event("a2", "a", "view", at: now)])
        let generation = { store.memory.withLock { $0.fileGeneration } }
        try service.define(feature("views", "view", .count), backfill: true)
        let backfilled = generation()
        // A retry (the client saw DEADLINE_EXCEEDED) finds it done: no second backfill.
        try service.define(feature("views", "view", .count), backfill: true)
        #expect(generation() == backfilled)
        #expect(try await service.features("a") == ["views": 2])
        // A feature defined without backfill, then backfilled: done then.
        try service.define(feature("views_new", "view", .count))
        try service.define(feature("views_new", "view", .count), backfill: true)
        #expect(generation() == backfilled + 1)
        #expect(try await service.features("a") == ["views": 2, "views_new": 2])

        for n in 2..<ProfileStore.maxFeatures { try service.define(feature("f\(n)", "view", .count)) }
        await expectCode(.resourceExhausted, message: "feature: 500 features are defined, at most 500") {
            try service.define(feature("one_more", "view", .count))
        }
        try service.define(feature("f2", "view", .sum))  // a new version of one defined
        for n in 0..<ProfileStore.maxSegments { try service.segment("s\(n)", "feature.views >= \(n)") }
        await expectCode(.resourceExhausted, message: "segment: 500 segments are defined, at most 500") {
            try service.segment("one_more", "feature.views >= 1")
        }
        try service.segment("s0", "feature.views >= 2")
        #expect(Set(try await service.profile("a").segments) == ["s0", "s1", "s2"])  // views is 2
    }

    @Test("a backfill that fails after its definition committed leaves its persons to the next start, which recomputes them")
    func failedBackfill() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let now = clock.read()
        // The first store is closed before the restart.
        do {
            let service = try makeProfile(directory, clock: clock, flushThreshold: 2)
            let store = service.store
            try service.define(feature("views", "view", .count))
            _ = try await service.track([event("a1", "a", "view", at: now), event("a2", "a", "view", at: now), event("b1", "b", "view", at: now)])

            // Another connection holds the state file's write lock: the backfill fails (after 5 s).
            // The flush the Track started (threshold 2) must be done first: the blocker, taking
            // the lock while it wrote, failed at once ("database is locked", two full runs).
            store.waitForFlush()
            var waits = Configuration()
            waits.busyMode = .timeout(5)
            let blocker = try DatabaseQueue(path: directory + "/profile-state.sqlite", configuration: waits)
            let release = try holdOnThread { done in
                try blocker.inTransaction(.immediate) { _ in
                    done()
                    return .rollback
                }
            }
            // Off the cooperative pool: it waits out SQLite's 5 s busy timeout.
            await #expect(throws: (any Error).self) { try await offPool { try service.define(feature("views_again", "view", .count), backfill: true) } }
            release()
            // Later flushes (threshold 2) and their log pruning must not drop the backfill's persons.
            for n in 0..<3 { _ = try await service.track([event("c\(n)", "c\(n)", "view", at: now), event("d\(n)", "d\(n)", "view", at: now)]) }
            store.waitForFlush()
            _ = try await service.track([event("e", "e", "view", at: now)])
        }
        let restarted = try makeProfile(directory, clock: clock)
        #expect(try await restarted.features("a") == ["views": 2, "views_again": 2])
        #expect(try await restarted.features("b") == ["views": 1, "views_again": 1])
    }

    @Test("clean copies kept after a flush count on correctly, and merges, splits and erasure replace them")
    func cleanStates() async throws {
        let clock = TestClock()
        let now = clock.read()
        // Every write flushes (threshold 1), so every later event starts from a clean copy.
        let service = try makeProfile(temporaryDirectory("profile-test"), clock: clock, flushThreshold: 1, cachePersons: 3)
        let store = service.store
        try service.define(feature("views", "view", .count))
        for round in 0..<3 {
            _ = try await service.track((0..<5).map { event("r\(round)-\($0)", "p\($0)", "view", at: now - Int64($0) * minute) })
        }
        store.waitForFlush()
        #expect(store.memory.withLock { $0.clean.count } == 3)  // at most cachePersons copies
        for p in 0..<5 { #expect(try await service.features("p\(p)") == ["views": 3]) }

        // Merge p1 into p0, then split it off again: the copies of both are replaced.
        try store.apply([(1, .merge(target: "p0", sources: ["p1"]))], nowMs: now)
        #expect(try await service.features("p0") == ["views": 6])
        _ = try await service.track([event("after-merge", "p0", "view", at: now)])
        #expect(try await service.features("p0") == ["views": 7])
        try store.apply([(2, .unmerge(survivor: "p0", split: "p1"))], nowMs: now)
        #expect(try await service.features("p0") == ["views": 4])
        #expect(try await service.features("p1") == ["views": 3])

        // Erasure: no copy survives in memory or in the file.
        _ = try await service.track([event("last", "p2", "view", at: now)])
        _ = try store.erase(person: "p2", nowMs: now)
        #expect(store.cachedState("p2") == nil)
        await expectCode(.notFound) { _ = try await service.features("p2") }

        // A store that keeps no clean copies gives the same answers.
        let plain = try makeProfile(temporaryDirectory("profile-test"), clock: clock, flushThreshold: 1, cachePersons: 0)
        let uncached = plain.store
        try plain.define(feature("views", "view", .count))
        for round in 0..<3 { _ = try await plain.track([event("u\(round)", "q", "view", at: now)]) }
        uncached.waitForFlush()
        #expect(uncached.memory.withLock { $0.clean.isEmpty })
        #expect(try await plain.features("q") == ["views": 3])
    }

    @Test("concurrent Track calls (sharing transactions) count every event once, duplicates across calls included")
    func concurrentTrack() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        try service.define(feature("views", "view", .count))
        let now = clock.read()
        // 32 calls of 50 events over 5 persons; calls 2k and 2k+1 carry the same events.
        let responses = try await withThrowingTaskGroup(of: ProfileV1.TrackResponse.self) { group in
            for call in 0..<32 {
                group.addTask {
                    try await service.track((0..<50).map { i in event("c\(call / 2)-\(i)", "p\(i % 5)", "view", at: now - Int64(i) * 1000) })
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(responses.reduce(0) { $0 + Int($1.accepted) } == 16 * 50)
        #expect(responses.reduce(0) { $0 + Int($1.duplicates) } == 16 * 50)
        for person in 0..<5 { #expect(try await service.features("p\(person)") == ["views": Double(16 * 10)]) }
    }

    @Test("the profile settings keep their default when missing and name a bad value")
    func configuration() throws {
        #expect(try JSONDecoder().decode(ProfileConfiguration.self, from: Data("{}".utf8)) == ProfileConfiguration())
        #expect(ProfileConfiguration().stateFlushPersons == 50_000 && ProfileConfiguration().stateCachePersons == 100_000)
        #expect(try JSONDecoder().decode(ProfileConfiguration.self, from: Data(#"{"stateCachePersons": 0}"#.utf8)).stateCachePersons == 0)
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(ProfileConfiguration.self, from: Data(#"{"stateCachePersons": -1}"#.utf8)) }
        #expect(try JSONDecoder().decode(ProfileConfiguration.self, from: Data(#"{"stateFlushPersons": 5}"#.utf8)).stateFlushPersons == 5)
        #expect(try JSONDecoder().decode(ProfileConfiguration.self, from: Data(#"{"factsCacheBytes": 1000}"#.utf8)).factsCacheBytes == 1000)
        #expect(ProfileConfiguration().stateCacheBytes == 512 << 20 && ProfileConfiguration().factsCacheBytes == 256 << 20)
        do {
            _ = try JSONDecoder().decode(ProfileConfiguration.self, from: Data(#"{"stateCacheBytes": -1}"#.utf8))
            Issue.record("accepted a negative stateCacheBytes")
        } catch {
            #expect("\(error)".contains("stateCacheBytes must be between 0"), "\(error)")
        }
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(ProfileConfiguration.self, from: Data(#"{"stateFlushPersons": 0}"#.utf8)) }
        #expect(ProfileConfiguration().factsCachePersons == 100_000)
        #expect(try JSONDecoder().decode(ProfileConfiguration.self, from: Data(#"{"factsCachePersons": 0}"#.utf8)).factsCachePersons == 0)
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(ProfileConfiguration.self, from: Data(#"{"factsCachePersons": -1}"#.utf8)) }
    }

    @Test("a batch rejects bad events one by one, naming the field, and keeps the rest")
    func perEventRejections() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        let now = clock.read()
        var noPerson = event("e3", "p1", "view", at: now)
        noPerson.person = nil
        let response = try await service.track([
            event("e0", "p1", "view", at: now),
            event("", "p1", "view", at: now),
            event("e2", "p1", "bad type!", at: now),
            noPerson,
            event("e4", "p1", "view", at: now + 2 * 86_400_000),
            event("e5", "p1", "view", at: now, ["": .bool(true)]),
            event("e6", "p1", "view", at: now, value: .infinity),
            event("e7", "p1", "view", at: now - hour),
            // Finite, but two of them would sum to infinity.
            event("e8", "p1", "view", at: now, value: 1e308),
            event("e9", "p1", "view", at: now, ["price": .number(-1e300)]),
        ])
        #expect(response.accepted == 2)
        #expect(response.rejections.map(\.index) == [1, 2, 3, 4, 5, 6, 8, 9])
        let reasons = response.rejections.map(\.reason)
        #expect(reasons[0].hasPrefix("event_id:") && reasons[1].hasPrefix("type:") && reasons[2].hasPrefix("person:"))
        #expect(reasons[3].hasPrefix("occurred_at_ms:") && reasons[4].hasPrefix("properties[0].name:") && reasons[5].hasPrefix("value:"))
        #expect(reasons[6].hasPrefix("value:") && reasons[7].hasPrefix("properties[0].value:"), "\(reasons.suffix(2))")
        await expectInvalid("events") { _ = try await service.track([]) }
    }

    @Test("a distinct count keeps each value's 64-bit hash, not its text; a state written before with texts counts on, each text once")
    func distinctHashes() throws {
        let spec = try FeatureSpec(feature("pages", "view", .distinctCount, property: "page"))
        let now: Int64 = 1_700_000_000_000
        func view(_ id: String, _ page: RuleValue) -> TrackedEvent {
            TrackedEvent(eventID: id, personID: "p", type: "view", occurredAtMs: now - 1000, properties: ["page": page])
        }
        // As a state written before hashes holds them: the texts.
        var state = ProfileStoreV1.FeatureState()
        state.name = "pages"
        state.version = spec.version
        state.distinct = ["home", "5"].map { text in
            var value = ProfileStoreV1.DistinctValue()
            value.value = text
            value.lastMs = now - 2000
            return value
        }
        #expect(spec.value(state, now: now) == 2)
        let long = String(repeating: "x", count: 1024)
        for (n, page) in [RuleValue.string("home"), .number(5), .string("cart"), .string(long), .string(long)].enumerated() {
            spec.apply(view("e\(n)", page), to: &state, now: now)
        }
        #expect(spec.value(state, now: now) == 4)  // home, 5 (as before, by its text "5"), cart, the long one
        #expect(state.distinct.allSatisfy { $0.value.isEmpty && $0.hash != 0 })
        #expect(state.serializedBytes().count < 200)  // not the 1 KB value
        #expect(state.distinct.first { $0.hash == FeatureSpec.distinctHash("home") }?.lastMs == now - 1000)
    }

    @Test("a distinct count over a window agrees with counting the values seen within it, for random events in any order; a state in insertion order (written before) is put in hash order")
    func distinctAgainstCounting() throws {
        let spec = try FeatureSpec(feature("pages_1h", "view", .distinctCount, window: 3600, property: "page"))
        var generator = SystemRandomNumberGenerator()
        let start: Int64 = 1_700_000_000_000
        var state = ProfileStoreV1.FeatureState()
        state.name = "pages_1h"
        state.version = spec.version
        // Written before: hashed values in the order they came, not by hash.
        state.distinct = ["b", "a", "c"].map { text in
            var value = ProfileStoreV1.DistinctValue()
            value.hash = FeatureSpec.distinctHash(text)
            value.lastMs = start - 1000
            return value
        }
        var seen: [(page: String, at: Int64)] = [("b", start - 1000), ("a", start - 1000), ("c", start - 1000)]
        var now = start
        for n in 0..<3_000 {
            now += Int64.random(in: 0..<5_000, using: &generator)
            let at = now - Int64.random(in: 0..<5_400_000, using: &generator)  // late ones too, some past the window
            let page = "page-\(Int.random(in: 0..<400, using: &generator))"
            spec.apply(TrackedEvent(eventID: "e\(n)", personID: "p", type: "view", occurredAtMs: at, properties: ["page": .string(page)]),
                       to: &state, now: now)
            if at > now - 3_600_000 { seen.append((page, at)) }
            if n % 100 == 0 {
                let expected = Set(seen.filter { $0.at > now - 3_600_000 }.map(\.page)).count
                #expect(spec.value(state, now: now) == Double(expected), "after \(n) events")
            }
        }
        #expect(state.distinctByHash && zip(state.distinct, state.distinct.dropFirst()).allSatisfy { $0.hash < $1.hash })
    }

    @Test("windows count what is inside them, late events included, and forget what leaves")
    func windowEdges() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        try service.define(feature("views_1h", "view", .count, window: 3600))
        try service.define(feature("views_all", "view", .count))
        try service.define(feature("amount_1h", "view", .sum, window: 3600, property: "amount"))
        try service.define(feature("last_amount", "view", .last, window: 3600, property: "amount"))
        try service.define(feature("pages_1h", "view", .distinctCount, window: 3600, property: "page"))
        let now = clock.read()
        _ = try await service.track([
            event("in", "p", "view", at: now - 59 * minute, ["amount": .number(5), "page": .string("home")]),
            event("out", "p", "view", at: now - 61 * minute, ["amount": .number(100), "page": .string("cart")]),
            event("new", "p", "view", at: now - 1 * minute, ["amount": .number(2), "page": .string("home")]),
        ])
        // Late and out of order: older than the newest, still inside the window.
        _ = try await service.track([event("late", "p", "view", at: now - 30 * minute, ["amount": .number(1), "page": .string("shoes")])])
        #expect(try await service.features("p") == ["views_1h": 3, "views_all": 4, "amount_1h": 8, "last_amount": 2, "pages_1h": 2])

        clock.advance(seconds: 2 * 60)  // the event at -59 min is now at -61 min
        #expect(try await service.features("p") == ["views_1h": 2, "views_all": 4, "amount_1h": 3, "last_amount": 2, "pages_1h": 2])
        clock.advance(seconds: 3600)
        #expect(try await service.features("p") == ["views_1h": 0, "views_all": 4, "amount_1h": 0, "pages_1h": 0])
    }

    @Test("a decayed sum equals the closed form Σ v·2^(-(now-t)/h), whatever the arrival order")
    func decayClosedForm() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        try service.define(feature("recency", "click", .decayedSum, halfLife: 86_400))
        try service.define(feature("recent_shoes", "click", .decayedSum, halfLife: 3600, filter: #"event.category == "shoes""#))
        let now = clock.read()
        var generator = SystemRandomNumberGenerator()
        let events = (0..<200).map { i in
            event("c\(i)", "p", "click", at: now - Int64.random(in: 0...(30 * 86_400_000), using: &generator),
                  value: Double.random(in: 0...5, using: &generator), ["category": .string(i % 3 == 0 ? "shoes" : "hats")])
        }
        for chunk in stride(from: 0, to: events.count, by: 17) {
            _ = try await service.track(Array(events[chunk..<min(chunk + 17, events.count)]))
        }
        clock.advance(seconds: 5 * 3600)
        let at = clock.read()
        func closedForm(_ halfLifeMs: Double, _ include: (ProfileV1.Event) -> Bool) -> Double {
            events.filter(include).reduce(0) { $0 + $1.value * exp2(-Double(at - $1.occurredAtMs) / halfLifeMs) }
        }
        let features = try await service.features("p")
        let all = closedForm(86_400_000) { _ in true }
        let shoes = closedForm(3_600_000) { $0.properties.contains { $0.value == CommonV1.Value(.string("shoes")) } }
        #expect(abs(features["recency"]! - all) <= 1e-9 * all)
        #expect(abs(features["recent_shoes"]! - shoes) <= 1e-9 * max(shoes, 1e-12))
    }

    @Test("an event dated ahead of the clock counts in a decayed sum as if it happened now, not grown back from the future")
    func decayFutureEvent() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        try service.define(feature("minute", "click", .decayedSum, halfLife: 60))
        let now = clock.read()
        // A client's clock a day ahead (the most Track accepts), then one on time.
        _ = try await service.track([event("ahead", "p", "click", at: now + 86_400_000, value: 3),
                                     event("zero", "q", "click", at: now + 86_400_000, value: 0)])
        #expect(try await service.features("p")["minute"] == 3)
        #expect(try await service.features("q")["minute"] == 0)  // was NaN (0 × infinity)
        clock.advance(seconds: 60)
        _ = try await service.track([event("on-time", "p", "click", at: clock.read(), value: 1)])
        #expect(abs(try await service.features("p")["minute"]! - (1.5 + 1)) < 1e-9)
    }

    @Test("a feature defined later starts empty, or is backfilled from stored events")
    func backfill() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        let now = clock.read()
        // Ages 10, 70, 130 and 190 minutes for "a": three inside a 3-hour window.
        _ = try await service.track((0..<6).map { event("b\($0)", $0 < 4 ? "a" : "b", "purchase", at: now - Int64($0) * hour - 10 * minute, value: 1) })
        try service.define(feature("purchases_3h", "purchase", .count, window: 3 * 3600))
        #expect(try await service.features("a")["purchases_3h"] == 0)
        try service.define(feature("purchases_3h", "purchase", .count, window: 3 * 3600), backfill: true)
        #expect(try await service.features("a")["purchases_3h"] == 3)
        #expect(try await service.features("b")["purchases_3h"] == 0)
        // A new definition under the same name drops the old state rather than mixing the two.
        try service.define(feature("purchases_3h", "purchase", .count, window: 6 * 3600))
        #expect(try await service.features("a")["purchases_3h"] == 0)
        #expect(service.store.features.first { $0.name == "purchases_3h" }?.version == 2)
    }

    @Test("bad feature definitions name the field")
    func badDefinitions() async throws {
        let service = try makeProfile()
        await expectInvalid("feature.name") { try service.define(feature("", "x", .count)) }
        await expectInvalid("feature.aggregation") { try service.define(feature("f", "x", .unspecified)) }
        await expectInvalid("feature.half_life_seconds") { try service.define(feature("f", "x", .decayedSum)) }
        await expectInvalid("feature.window_seconds") { try service.define(feature("f", "x", .count, window: -1)) }
        await expectInvalid("feature.property") { try service.define(feature("f", "x", .distinctCount)) }
        await expectInvalid("feature.filter: at position 1") { try service.define(feature("f", "x", .count, filter: #"trait.a == 1"#)) }
    }
}

@Suite("profile: traits, segments, consent")
struct TraitSegmentConsentTests {
    @Test("the newest trait wins, whatever order the sources arrive in")
    func traitsNewestWins() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        let now = clock.read()
        _ = try await service.traits("p", ["tier": .string("gold"), "age": .number(41)], source: "crm", at: now - hour)
        let late = try await service.traits("p", ["tier": .string("silver"), "city": .string("Utrecht")], source: "web", at: now - 2 * hour)
        #expect(late.stale == ["tier"])
        let traits = try await service.profile("p").traits
        #expect(traits.map(\.name) == ["age", "city", "tier"])
        let tier = traits.first { $0.name == "tier" }!
        #expect(tier.value == CommonV1.Value(.string("gold")) && tier.source == "crm" && tier.ageSeconds == 3600)
    }

    @Test("segment rules are checked when defined, with the position of the error; membership comes with the profile")
    func segments() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        try service.define(feature("purchases_30d", "purchase", .count, window: 30 * 86_400))
        await expectInvalid("segment.rule: at position 25") { try service.segment("x", #"trait.tier == "gold" and"#) }
        await expectInvalid("segment.rule: at position 26") { try service.segment("x", #"trait.tier == "gold" and feature.nope >= 2"#) }
        await expectInvalid("segment.rule: at position 1") { try service.segment("x", #"event.x == 1"#) }
        // A rule that could never hold (before, accepted, and nobody was ever a member).
        await expectInvalid("segment.rule: at position 26: feature.purchases_30d is a number and never equals a string") {
            try service.segment("x", #"feature.purchases_30d >= "2""#)
        }
        await expectInvalid("segment.name") { try service.segment("", "true") }
        try service.segment("gold_buyers", #"trait.tier == "gold" and feature.purchases_30d >= 2"#)
        try service.segment("emailable", #"consent.marketing.email"#)
        let now = clock.read()
        _ = try await service.traits("p", ["tier": .string("gold")], at: now)
        _ = try await service.track([event("1", "p", "purchase", at: now)])
        #expect(try await service.profile("p").segments == [])
        _ = try await service.track([event("2", "p", "purchase", at: now)])
        try await service.consent("p", "marketing", .email, true, at: now)
        #expect(try await service.profile("p").segments == ["emailable", "gold_buyers"])
    }

    @Test("consent keeps its full history; the newest record per purpose and channel is current")
    func consentHistory() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        let now = clock.read()
        try await service.consent("p", "marketing", .email, true, at: now - 3 * hour, source: "signup")
        try await service.consent("p", "marketing", .email, false, at: now - hour, source: "unsubscribe-link")
        try await service.consent("p", "marketing", .email, true, at: now - 2 * hour, source: "late-import")
        try await service.consent("p", "marketing", .sms, true, at: now, source: "app")
        var request = ProfileV1.GetConsentRequest()
        request.person = personRef("p")
        request.includeHistory = true
        let consent = try await service.getConsent(request)
        #expect(consent.current.map { "\($0.channel.rawValue):\($0.granted):\($0.source)" } == ["1:false:unsubscribe-link", "2:true:app"])
        #expect(consent.history.map(\.source) == ["signup", "late-import", "unsubscribe-link", "app"] && !consent.historyTruncated)
        // The newest records only, oldest first, and a flag when older ones were left out.
        request.historyLimit = 2
        let newest = try await service.getConsent(request)
        #expect(newest.history.map(\.source) == ["unsubscribe-link", "app"] && newest.historyTruncated)
        #expect(newest.current == consent.current)
        request.historyLimit = 10_001
        await expectInvalid("history_limit") { _ = try await service.getConsent(request) }
        request.historyLimit = 0
        await expectInvalid("consents[0].purpose") { try await service.consent("p", "", .email, true, at: now) }
        // A purpose ending in a channel's name would collide with another purpose's consent on
        // that channel (consent.marketing.email); before, granting it overrode a later denial.
        await expectInvalid("consents[0].purpose") { try await service.consent("p", "marketing.email", .unspecified, true, at: now) }
        try await service.consent("p", "marketing.weekly", .email, true, at: now)  // other dotted purposes stay valid
        request.person = personRef("nobody")
        request.includeHistory = false
        #expect(try await service.getConsent(request).current.isEmpty)
    }

    @Test("a person has at most 1,000 traits and consent for at most 1,000 purpose and channel pairs: more is RESOURCE_EXHAUSTED, and nothing of that call is kept")
    func perPersonLimits() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        let now = clock.read()
        for call in 0..<10 {
            _ = try await service.traits("p", Dictionary(uniqueKeysWithValues: (0..<100).map { ("t\(call * 100 + $0)", RuleValue.number(1)) }), at: now)
        }
        await expectCode(.resourceExhausted, message: "traits: person p would have 1001 traits; at most 1000") {
            _ = try await service.traits("p", ["t0": .number(2), "one-more": .number(1)], at: now + 1)
        }
        let traits = try await service.profile("p").traits
        #expect(traits.count == 1000 && traits.first { $0.name == "t0" }?.value == CommonV1.Value(.number(1)))
        _ = try await service.traits("p", ["t0": .number(3)], at: now + 2)  // a trait it has may change

        var request = ProfileV1.SetConsentRequest()
        request.person = personRef("p")
        func records(_ purposes: Range<Int>) -> [ProfileV1.ConsentRecord] {
            purposes.map { i in
                var record = ProfileV1.ConsentRecord()
                record.purpose = "purpose\(i)"
                record.channel = .email
                record.granted = true
                record.source = "form"
                record.atMs = now
                return record
            }
        }
        for call in 0..<10 {
            request.consents = records(call * 100..<(call + 1) * 100)
            _ = try await service.setConsent(request)
        }
        request.consents = records(1000..<1001)
        await expectCode(.resourceExhausted, message: "consents: person p would have consent for 1001 purpose and channel pairs; at most 1000") {
            _ = try await service.setConsent(request)
        }
        var change = records(5..<6)  // a pair it has may change
        change[0].source = "app"
        request.consents = change
        _ = try await service.setConsent(request)
        // A denial is never refused: withdrawing consent must always be possible (routing
        // passes unsubscribes on this way).
        var denial = records(1000..<1001)
        denial[0].granted = false
        request.consents = denial
        _ = try await service.setConsent(request)
        var get = ProfileV1.GetConsentRequest()
        get.person = personRef("p")
        #expect(try await service.getConsent(get).current.count == 1001)

        // A person a merge took past a limit may still change what they have.
        _ = try await service.traits("q", ["only": .number(1)], at: now)
        try service.store.apply([(1, .merge(target: "q", sources: ["p"]))], nowMs: now + 3)
        #expect(try await service.profile("q").traits.count == 1001)
        _ = try await service.traits("q", ["t0": .number(4)], at: now + 4)
        await expectCode(.resourceExhausted, message: "at most 1000") { _ = try await service.traits("q", ["new": .number(1)], at: now + 4) }
    }

    @Test("SetConsent: a retried record is not appended again; denials alone may take a person to 2,000 pairs, no further; current is each pair's newest")
    func consentRetriesAndDenials() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        let now = clock.read()
        func record(_ purpose: String, granted: Bool, at: Int64, source: String = "form") -> ProfileV1.ConsentRecord {
            var record = ProfileV1.ConsentRecord()
            record.purpose = purpose
            record.channel = .email
            record.granted = granted
            record.source = source
            record.atMs = at
            return record
        }
        var request = ProfileV1.SetConsentRequest()
        request.person = personRef("p")
        var get = ProfileV1.GetConsentRequest()
        get.person = personRef("p")
        get.includeHistory = true
        request.consents = [record("news", granted: true, at: now - 10)]
        for _ in 0..<3 { _ = try await service.setConsent(request) }  // a call retried twice
        #expect(try await service.getConsent(get).history.count == 1)
        // The same again at another time, or from another source, is history.
        request.consents = [record("news", granted: true, at: now - 5), record("news", granted: true, at: now - 5, source: "app")]
        _ = try await service.setConsent(request)
        // Two records at one time: the one inserted last is current.
        request.consents = [record("news", granted: false, at: now - 2), record("news", granted: true, at: now - 2, source: "support")]
        _ = try await service.setConsent(request)
        // Retried, neither is appended again (before: the older of the two was, each time).
        _ = try await service.setConsent(request)
        let consent = try await service.getConsent(get)
        #expect(consent.history.count == 5)
        #expect(consent.current.map { "\($0.purpose) \($0.granted) \($0.source)" } == ["news true support"])
        // A record known already that would govern again is appended: deny, grant, deny at one
        // time from one source, in three calls, withdraws.
        for granted in [false, true, false] {
            request.consents = [record("news", granted: granted, at: now - 1, source: "web")]
            _ = try await service.setConsent(request)
        }
        let withdrawn = try await service.getConsent(get)
        #expect(withdrawn.current.map { "\($0.purpose) \($0.granted) \($0.source)" } == ["news false web"])
        #expect(withdrawn.history.count == 8)

        // Denials alone go past 1,000 pairs (withdrawing must stay possible), to 2,000: "news"
        // and 1,999 more.
        for call in 0..<20 {
            request.consents = (call * 100..<min(1999, (call + 1) * 100)).map { record("d\($0)", granted: false, at: now) }
            _ = try await service.setConsent(request)
        }
        await expectCode(.resourceExhausted, message: "would have consent for 2001 purpose and channel pairs; at most 1000, or 2000 with denials") {
            request.consents = [record("one-more", granted: false, at: now)]
            _ = try await service.setConsent(request)
        }
        request.consents = [record("d7", granted: true, at: now)]  // a pair it has still changes, granted again too
        _ = try await service.setConsent(request)
        let current = try await service.getConsent(get).current
        #expect(current.count == 2000 && current.first { $0.purpose == "d7" }?.granted == true)
    }

    @Test("GetProfile answers from the memory it filled, which follows every write (traits, consent, events, merges, erasure); a read that raced a write keeps no old copy")
    func profileFromMemory() async throws {
        let clock = TestClock()
        let service = try makeProfile(clock: clock)
        let store = service.store
        // As when more persons than fit were stored at start: memory holds some, and a miss reads the files.
        store.facts.withLock { $0.complete = false }
        store.memory.withLock { $0.complete = false }
        try service.define(feature("views", "view", .count))
        try service.segment("gold", #"trait.tier == "gold" and consent.marketing.email"#)
        let now = clock.read()
        func inMemory(_ person: String) -> ProfileStore.Profile? {
            guard case .answered(let profile) = store.profileInMemory(person: person, nowMs: clock.read()) else {
                Issue.record("\(person)'s profile is not all in memory")
                return nil
            }
            return profile
        }
        func tier(_ profile: ProfileStore.Profile?) -> RuleValue? { profile?.traits.first { $0.name == "tier" }?.value }

        // Traits and consent only (no event, so no state in the file): the first read keeps both.
        _ = try await service.traits("a", ["tier": .string("gold")], at: now)
        try await service.consent("a", "marketing", .email, true, at: now)
        guard case .readFiles = store.profileInMemory(person: "a", nowMs: now) else {
            Issue.record("a person never read has no state in memory yet")
            return
        }
        #expect(try await service.profile("a").segments == ["gold"])
        #expect(inMemory("a")?.segments == ["gold"])
        // Writes replace what memory holds.
        _ = try await service.traits("a", ["tier": .string("silver")], at: now + 1)
        #expect(tier(inMemory("a")) == .string("silver") && inMemory("a")?.segments == [])
        _ = try await service.traits("a", ["tier": .string("gold")], at: now + 2)
        try await service.consent("a", "marketing", .email, false, at: now + 1)
        #expect(inMemory("a")?.consent.map(\.granted) == [false] && inMemory("a")?.segments == [])
        _ = try await service.track([event("a-1", "a", "view", at: now)])
        #expect(inMemory("a")?.features.map(\.value) == [1])

        // A read of the file that began before a write keeps nothing: its copy is older.
        let factsGeneration = store.facts.withLock { $0.generation }
        let before = try await store.pool.read { try ProfileStore.readFacts($0, "a") }
        _ = try await service.traits("a", ["tier": .string("bronze")], at: now + 3)
        store.keepFacts("a", before, since: factsGeneration)
        #expect(tier(inMemory("a")) == .string("bronze"))
        // ... nor does a read of a state the file gained meanwhile (the copy evicted since).
        let fileGeneration = store.memory.withLock { $0.fileGeneration }
        let noState = try await store.statePool.read { try ProfileStore.loadState($0, "b") }
        _ = try await service.track([event("b-1", "b", "view", at: now)])
        try store.flush()
        store.memory.withLock { _ = $0.dropClean("b") }
        store.keepClean("b", noState, since: fileGeneration)
        #expect(store.cachedState("b") == nil)
        #expect(try await service.features("b") == ["views": 1])
        #expect(inMemory("b")?.features.map(\.value) == [1])

        // A merge moves the traits: both persons are read again.
        _ = try await service.traits("b", ["vip": .bool(true)], at: now)
        _ = try await service.profile("b")
        try store.apply([(1, .merge(target: "a", sources: ["b"]))], nowMs: now)
        #expect(try await service.profile("a").traits.map(\.name) == ["tier", "vip"])
        #expect(inMemory("a")?.features.map(\.value) == [2])
        #expect(try await service.profile("b").personId == "a")  // b now names a
        // Erasure leaves nothing of the person in memory.
        _ = try store.erase(person: "a", nowMs: now)
        #expect(store.facts.withLock { $0.cache["a"] } == nil)
        await expectCode(.notFound) { _ = try await service.profile("a") }
        // (The service refuses an erased person before reading, so memory may not know yet.)
        if case .answered(let profile) = store.profileInMemory(person: "a", nowMs: clock.read()) { #expect(profile == nil) }
        #expect(store.cachedState("a")?.events ?? 0 == 0)  // its state in memory is the empty one erasure left
    }

    @Test("while every person fits in memory, a restart loads them all and GetProfile reads no file, for unknown persons too; one more, and misses read the file")
    func everyoneInMemory() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let now = clock.read()
        var service = try makeProfile(directory, clock: clock, cachePersons: 3, factsPersons: 3)
        try service.define(feature("views", "view", .count))
        _ = try await service.traits("a", ["tier": .string("gold")], at: now)
        try await service.consent("b", "marketing", .email, true, at: now)
        _ = try await service.track([event("1", "a", "view", at: now), event("2", "c", "view", at: now)])
        try service.store.settle()

        service = try makeProfile(directory, clock: clock, cachePersons: 3, factsPersons: 3)
        let store = service.store
        func lookup(_ person: String) -> (answered: Bool, profile: ProfileStore.Profile?) {
            guard case .answered(let profile) = store.profileInMemory(person: person, nowMs: now) else { return (false, nil) }
            return (true, profile)
        }
        func complete(_ store: ProfileStore) -> (facts: Bool, states: Bool) {
            (store.facts.withLock { $0.complete }, store.memory.withLock { $0.complete })
        }
        #expect(complete(store) == (true, true))
        #expect(lookup("a").profile?.traits.map(\.name) == ["tier"] && lookup("a").profile?.features.map(\.value) == [1])
        #expect(lookup("b").profile?.consent.count == 1 && lookup("c").profile?.features.map(\.value) == [1])
        #expect(lookup("nobody").answered && lookup("nobody").profile == nil)  // known to be unknown: no file read
        await expectCode(.notFound) { _ = try await service.profile("nobody") }

        // A fourth person with traits: the oldest copy goes, and misses read the file again.
        _ = try await service.traits("d", ["tier": .string("silver")], at: now)
        _ = try await service.traits("e", ["tier": .string("bronze")], at: now)
        #expect(complete(store) == (false, true))
        #expect(!lookup("nobody").answered)
        #expect(try await service.profile("a").traits.map(\.name) == ["tier"])
        #expect(try await service.profile("b").consent.count == 1)
        // ... and likewise a fourth feature state, once written.
        _ = try await service.track([event("3", "d", "view", at: now), event("4", "e", "view", at: now)])
        try store.flush()
        #expect(complete(store) == (false, false))
        #expect(try await service.features("c") == ["views": 1])
        #expect(try await service.features("e") == ["views": 1])

        // More persons than fit at start: nothing is assumed.
        let small = try makeProfile(directory, clock: clock, cachePersons: 2, factsPersons: 2)
        #expect(complete(small.store) == (false, false))
        #expect(try await small.profile("e").traits.map(\.name) == ["tier"])
        #expect(try await small.features("a") == ["views": 1])
        await expectCode(.notFound) { _ = try await small.profile("nobody") }
        // Nothing kept in memory at all: the same answers, from the files.
        let none = try makeProfile(directory, clock: clock, cachePersons: 0, factsPersons: 0)
        #expect(complete(none.store) == (false, false))
        #expect(try await none.profile("d").traits.map(\.name) == ["tier"])
        #expect(try await none.features("e") == ["views": 1])
        #expect(none.store.facts.withLock { $0.cache.count } == 0)
    }

    @Test("the caches hold persons up to their byte limits too: long traits or many distinct values fill them sooner; misses read the file, answers stay right")
    func cachesBoundedInBytes() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let now = clock.read()
        let service = try makeProfile(directory, clock: clock, flushThreshold: 1, cacheBytes: 8_000, factsBytes: 8_000)
        try service.define(feature("pages", "view", .distinctCount, property: "page"))
        // Ten persons, each with a trait of 1,000 bytes and 50 distinct pages: a person takes
        // about 1.2 KB of traits and 2.2 KB of state, by the estimate.
        let bio = String(repeating: "x", count: 1000)
        for p in 0..<10 {
            _ = try await service.traits("p\(p)", ["bio": .string(bio)], at: now)
            _ = try await service.track((0..<50).map { event("p\(p)-\($0)", "p\(p)", "view", at: now, ["page": .string("page-\($0)")]) })
        }
        try service.store.flush()
        // Before, both held all ten: the limits counted persons only (100,000 by default),
        // whatever each took.
        let facts = service.store.facts.withLock { ($0.cache.count, $0.cache.totalCost, $0.complete) }
        #expect(facts.0 < 10 && facts.0 > 0 && facts.1 <= 8_000 && !facts.2, "\(facts)")
        let states = service.store.memory.withLock { ($0.clean.count, $0.cleanBytes, $0.complete) }
        #expect(states.0 < 10 && states.1 <= 8_000 && !states.2, "\(states)")
        for p in 0..<10 {
            #expect(try await service.profile("p\(p)").traits.map(\.name) == ["bio"])
            #expect(try await service.features("p\(p)") == ["pages": 50])
        }
        // The estimates follow what the entries hold.
        #expect(ProfileStore.approximateBytes(ProfileStore.Facts(traits: [.init(name: "bio", value: .string(bio), source: "t", updatedAtMs: 0)])) > 1000)
    }

    @Test("GetProfile of an unknown person is NOT_FOUND; unknown fields are INVALID_ARGUMENT")
    func profileErrors() async throws {
        let service = try makeProfile()
        await #expect(throws: RPCError(.notFound, "person: no profile for ghost")) { _ = try await service.profile("ghost") }
        var request = ProfileV1.GetProfileRequest()
        request.person = personRef("ghost")
        request.fields = ["traits", "secrets"]
        await expectInvalid("fields[1]") { _ = try await service.getProfile(request) }
        request.person = nil
        request.fields = []
        await expectInvalid("person") { _ = try await service.getProfile(request) }
    }
}

@Suite("profile: merges and erasure")
struct MergeEraseTests {
    static let definitions = [
        feature("views_1d", "view", .count, window: 86_400),
        feature("spend", "purchase", .sum),
        feature("last_spend", "purchase", .last),
        feature("pages", "view", .distinctCount, window: 7 * 86_400, property: "page"),
        feature("recency", "view", .decayedSum, halfLife: 3600),
    ]

    /// Events of two people; the merged profile must equal that of one person who had all of them.
    static func history(_ who: String, seed: Int, now: Int64) -> [ProfileV1.Event] {
        (0..<40).map { i in
            let age = Int64((i * 7919 + seed * 104_729) % (3 * 86_400)) * 1000
            return i % 4 == 0
                ? event("\(who)-\(i)", who, "purchase", at: now - age, value: Double(i % 7))
                : event("\(who)-\(i)", who, "view", at: now - age, value: 1, ["page": .string("page\((i + seed) % 9)")])
        }
    }

    @Test("merges from the identity feed give the features of one person with all the events; unmerge splits them back")
    func mergeAndSplitFollowTheIdentityFeed() async throws {
        let clock = TestClock()
        try await withIdentity(clock: clock) { identity, client in
            let service = try makeProfile(clock: clock, identity: client)
            let reference = try makeProfile(clock: clock)
            for definition in Self.definitions {
                try service.define(definition)
                try reference.define(definition)
            }
            func ref(_ type: String, _ value: String) -> CommonV1.PersonRef { personRef(identifier(type, value)) }
            let now = clock.read()
            // Two anonymous visitors, known only by cookie and by email, each with a history.
            var cookieEvents = Self.history("a", seed: 1, now: now)
            var emailEvents = Self.history("b", seed: 2, now: now)
            for i in cookieEvents.indices { cookieEvents[i].person = ref("cookie_id", "ck-1") }
            for i in emailEvents.indices { emailEvents[i].person = ref("email", "ann@example.org") }
            #expect(try await service.track(cookieEvents).accepted == 40)
            #expect(try await service.track(emailEvents).accepted == 40)
            var traitRequest = ProfileV1.SetTraitsRequest()
            traitRequest.person = ref("email", "ann@example.org")
            traitRequest.traits = [field("tier", .string("gold"))]
            traitRequest.updatedAtMs = now
            _ = try await service.setTraits(traitRequest)
            // A blocked value names nobody: the event is rejected, the service stays up.
            var blocked = event("blocked-1", "x", "view", at: now)
            blocked.person = ref("cookie_id", "null")
            let rejected = try await service.track([blocked])
            #expect(rejected.accepted == 0 && rejected.rejections.first?.reason.hasPrefix("person.identifiers:") == true, "\(rejected)")
            // An invalid event creates no person for its new identifiers (before, they were
            // resolved, and created, before the event was checked).
            var invalid = event("bad-1", "x", "bad type!", at: now)
            invalid.person = ref("email", "nobody-yet@example.org")
            #expect(try await service.track([invalid]).rejections.first?.reason.hasPrefix("type:") == true)
            var lookup = IdentityV1.ResolveRequest()
            lookup.identifiers = [identifier("email", "nobody-yet@example.org")]
            #expect(try await identity.resolve(lookup).personId.isEmpty)
            traitRequest.person = ref("email", "test@test.com")
            await expectInvalid("person.identifiers") { _ = try await service.setTraits(traitRequest) }
            traitRequest.person = ref("email", "ann@example.org")

            // The identity service learns they are one person.
            var link = IdentityV1.LinkRequest()
            link.identifiers = [identifier("cookie_id", "ck-1"), identifier("email", "ann@example.org")]
            let linked = try await identity.link(link)
            #expect(linked.mergedPersonIds.count == 1)
            #expect(try await IdentityFeedFollower(store: service.store, identity: client, logger: Logger(label: "t"), clock: clock.read).pollOnce() == 1)

            // Reference: one person who had all 80 events from the start.
            var all = Self.history("a", seed: 1, now: now) + Self.history("b", seed: 2, now: now)
            for i in all.indices { all[i].person = personRef("one") }
            _ = try await reference.track(all)
            let merged = try await service.profile(linked.personId)
            let expected = try await reference.features("one")
            #expect(merged.features.count == expected.count)
            for feature in merged.features {
                #expect(abs(feature.value - expected[feature.name]!) <= 1e-9 * max(1, abs(feature.value)), "\(feature.name)")
            }
            #expect(merged.traits.map(\.name) == ["tier"])
            let absorbed = linked.mergedPersonIds[0]
            // The absorbed id now names the survivor.
            #expect(try await service.profile(absorbed).personId == linked.personId)

            // The operator undoes the merge (the store's first): the absorbed person comes
            // back under its own id, with the events first tracked for it.
            var unmerge = IdentityV1.UnmergeRequest()
            unmerge.personId = linked.personId
            unmerge.mergeId = 1
            _ = try await identity.unmerge(unmerge)
            let follower = IdentityFeedFollower(store: service.store, identity: client, logger: Logger(label: "t"), clock: clock.read)
            #expect(try await follower.pollOnce() == 1)
            #expect(try await follower.pollOnce() == 0)
            let survivorViews = try await service.features(linked.personId)["views_1d"]!
            let absorbedViews = try await service.features(absorbed)["views_1d"]!
            #expect(survivorViews + absorbedViews == expected["views_1d"]!)
            #expect(survivorViews > 0 && absorbedViews > 0)
        }
    }

    @Test("writes and reads for a person the feed merged away go to the survivor, and an unmerge takes them back; an erased person gets no new data; both hold across a restart")
    func writesFollowMergesAndErasures() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let now = clock.read()
        do {
            let service = try makeProfile(directory, clock: clock)
            try service.define(feature("views", "view", .count))
            _ = try await service.track([event("a1", "a", "view", at: now), event("b1", "b", "view", at: now)])
            try service.store.apply([(1, .merge(target: "b", sources: ["a"]))], nowMs: now)
            // A SetTraits for a that the service mapped before the merge, and that waited for the
            // writer meanwhile, is refused there (retryable), not written under a.
            #expect(throws: RPCError(.aborted, "person: a was merged, unmerged or erased while this call waited; retry it")) {
                _ = try service.store.setTraits(person: "a", [(name: "tier", value: .string("silver"))], source: "crm", updatedAtMs: now)
            }
            // A client still holding a's id: before, these were kept under a, in no profile.
            #expect(try await service.track([event("a2", "a", "view", at: now)]).accepted == 1)
            #expect(try await service.traits("a", ["tier": .string("gold")], at: now).personId == "b")
            try await service.consent("a", "marketing", .email, true, at: now)
            let survivor = try await service.profile("a")
            #expect(survivor.personId == "b" && survivor.traits.map(\.name) == ["tier"] && survivor.consent.count == 1)
            #expect(try await service.features("b")["views"] == 3)
            // The unmerge takes back the events first tracked for a, the late one too.
            try service.store.apply([(2, .unmerge(survivor: "b", split: "a"))], nowMs: now)
            #expect(try await service.features("a")["views"] == 2)
            #expect(try await service.features("b")["views"] == 1)
            #expect(try await service.track([event("a3", "a", "view", at: now)]).accepted == 1)
            #expect(try await service.features("a")["views"] == 3)

            // Erased through the feed, and directly.
            try service.store.apply([(3, .erase(person: "b", absorbed: []))], nowMs: now)
            var erase = ProfileV1.EraseRequest()
            erase.personId = "a"
            _ = try service.erase(erase)
        }
        // After a restart, as before it.
        let service = try makeProfile(directory, clock: clock)
        for person in ["a", "b"] {
            let refused = try await service.track([event("\(person)-late", person, "view", at: now)])
            #expect(refused.accepted == 0 && refused.rejections.first?.reason == "person: person \(person) was erased", "\(refused)")
            await #expect(throws: RPCError(.notFound, "person: person \(person) was erased")) {
                _ = try await service.traits(person, ["tier": .string("silver")], at: now)
            }
            await #expect(throws: RPCError.self) { _ = try await service.profile(person) }
        }
        // An event that passed the service's check before its person was erased reaches the
        // store: it is not stored, and it is said so (before: counted as a duplicate).
        let late = try await service.store.track([TrackedEvent(eventID: "b-in-flight", personID: "b", type: "view", occurredAtMs: now),
                                                  TrackedEvent(eventID: "c1", personID: "c", type: "view", occurredAtMs: now)], nowMs: now)
        #expect(late.outcomes == [.personErased, .stored])
        _ = try service.store.erase(person: "c", nowMs: now)
        let files = try await service.store.pool.read { db in
            try Int.fetchOne(db, sql: "SELECT (SELECT count(*) FROM event) + (SELECT count(*) FROM event_tail) + (SELECT count(*) FROM trait) + (SELECT count(*) FROM consent)")
        }
        #expect(files == 0)
    }

    @Test("an id erased here stays erased when the feed later merges it: persons merged into it are erased too, and it is never given a survivor")
    func mergesAroundErasedIDs() async throws {
        let clock = TestClock()
        let now = clock.read()
        let service = try makeProfile(clock: clock)
        try service.define(feature("views", "view", .count))
        _ = try await service.track([event("t1", "t", "view", at: now), event("s1", "s", "view", at: now),
                                     event("x1", "x", "view", at: now), event("u1", "u", "view", at: now)])
        _ = try await service.traits("s", ["tier": .string("gold")], at: now)
        // Erased in the profile service alone (Profile/Erase); identity still knows them.
        for person in ["t", "x"] {
            var erase = ProfileV1.EraseRequest()
            erase.personId = person
            _ = try service.erase(erase)
        }
        // s merges into erased t; erased x merges into u. Before: s's data moved under t, where
        // nobody could read it, and x took u as its survivor and got data again.
        try service.store.apply([(1, .merge(target: "t", sources: ["s"])), (2, .merge(target: "u", sources: ["x"]))], nowMs: now)
        let rows = try await service.store.pool.read { db in
            try Int.fetchOne(db, sql: "SELECT (SELECT count(*) FROM event WHERE person_id IN ('s', 't')) + (SELECT count(*) FROM event_tail WHERE person_id IN ('s', 't')) + (SELECT count(*) FROM trait)")
        }
        #expect(rows == 0)
        for person in ["s", "t", "x"] {
            let refused = try await service.track([event("\(person)-2", person, "view", at: now)])
            #expect(refused.accepted == 0 && refused.rejections.first?.reason == "person: person \(person) was erased", "\(refused)")
        }
        #expect(try await service.features("u") == ["views": 1])
        // Nor does an unmerge give an erased id back (before: s was live again, and took data).
        try service.store.apply([(3, .unmerge(survivor: "t", split: "s"))], nowMs: now)
        let refused = try await service.track([event("s-3", "s", "view", at: now)])
        #expect(refused.accepted == 0 && refused.rejections.first?.reason == "person: person s was erased", "\(refused)")
    }

    @Test("LAST of events at the same time is the one with the greatest id, whatever their order, live and after a rebuild")
    func lastTies() async throws {
        let clock = TestClock()
        let now = clock.read()
        let service = try makeProfile(clock: clock, tailEvents: 1)  // every event moves to `event` at once
        try service.define(feature("last_price", "buy", .last))
        // Ids in an order unlike that of arrival.
        for (id, value) in [("y", 2.0), ("z", 1.0), ("x", 3.0)] {
            _ = try await service.track([event(id, "p", "buy", at: now, value: value)])
        }
        #expect(try await service.features("p")["last_price"] == 1)
        try service.store.apply([(1, .merge(target: "p", sources: ["nobody"]))], nowMs: now)  // recomputes p
        #expect(try await service.features("p")["last_price"] == 1)
    }

    @Test("an unmerge gives the split person back the events of the persons it had absorbed too")
    func unmergeOfAChain() async throws {
        let clock = TestClock()
        let now = clock.read()
        let service = try makeProfile(clock: clock)
        try service.define(feature("views", "view", .count))
        _ = try await service.track([event("a1", "a", "view", at: now), event("b1", "b", "view", at: now), event("c1", "c", "view", at: now)])
        for person in ["a", "b", "c"] { _ = try await service.traits(person, ["name_\(person)": .string(person)], at: now) }
        try service.store.apply([(1, .merge(target: "b", sources: ["a"])), (2, .merge(target: "c", sources: ["b"]))], nowMs: now)
        #expect(try await service.features("c")["views"] == 3)
        #expect(try await service.profile("c").traits.map(\.name) == ["name_a", "name_b", "name_c"])
        // Undoing the second merge brings b back with a, as the identity service gives a's
        // identifiers back to b. Before, a's event stayed with c.
        try service.store.apply([(3, .unmerge(survivor: "c", split: "b"))], nowMs: now)
        #expect(try await service.features("b")["views"] == 2)
        #expect(try await service.features("c")["views"] == 1)
        #expect(try await service.profile("a").personId == "b")
        // Their traits too.
        #expect(try await service.profile("b").traits.map(\.name) == ["name_a", "name_b"])
        #expect(try await service.profile("c").traits.map(\.name) == ["name_c"])
    }

    @Test("the feed follower applies changes off Swift's cooperative pool (a long merge or erasure must not hold it)")
    func followerAppliesOffPool() async throws {
        final class Sink: IdentityChangeSink {
            let applied = Mutex<[(changes: Int, inTask: Bool)]>([])
            let cursor = Mutex<Int64>(0)
            func identityCursor() throws -> Int64 { cursor.withLock { $0 } }
            func apply(_ changes: [(seq: Int64, change: IdentityChange)], nowMs: Int64) throws {
                let inTask = withUnsafeCurrentTask { $0 != nil }
                applied.withLock { $0.append((changes.count, inTask)) }
                if let last = changes.last { cursor.withLock { $0 = last.seq } }
            }
        }
        let clock = TestClock()
        try await withIdentity(clock: clock) { identity, client in
            // Two persons, then one link between them: a merge in the change feed.
            for id in [identifier("cookie_id", "ck-1"), identifier("email", "ann@example.org")] {
                var resolve = IdentityV1.ResolveRequest()
                resolve.identifiers = [id]
                resolve.createIfMissing = true
                _ = try await identity.resolve(resolve)
            }
            var link = IdentityV1.LinkRequest()
            link.identifiers = [identifier("cookie_id", "ck-1"), identifier("email", "ann@example.org")]
            #expect(try await identity.link(link).mergedPersonIds.count == 1)
            let sink = Sink()
            let follower = IdentityFeedFollower(store: sink, identity: client, logger: Logger(label: "t"), clock: clock.read)
            #expect(try await follower.pollOnce() > 0)
            let applied = sink.applied.withLock { $0 }
            #expect(!applied.isEmpty && applied.allSatisfy { !$0.inTask }, "\(applied)")
            #expect(try await follower.pollOnce() == 0)
        }
    }

    @Test("the feed follower gives up a call the identity service never answers at its timeout, so that a hung peer cannot stop the feed for good")
    func followerCallTimesOut() async throws {
        final class Sink: IdentityChangeSink {
            func identityCursor() throws -> Int64 { 0 }
            func apply(_ changes: [(seq: Int64, change: IdentityChange)], nowMs: Int64) throws {}
        }
        let silent = try await silentServer()
        defer { silent.close(promise: nil) }
        let client = RPCClient(host: "127.0.0.1", port: silent.localAddress!.port!)
        defer { client.close() }
        let follower = IdentityFeedFollower(store: Sink(), identity: client, logger: Logger(label: "t"), callTimeout: .milliseconds(200), clock: { 0 })
        // Before, the call had no deadline: it waited for ever, and every later merge and erasure with it.
        await #expect(throws: RPCError.self, "DEADLINE_EXCEEDED") {
            do { _ = try await follower.pollOnce() } catch let error as RPCError {
                #expect(error.code == .deadlineExceeded, "\(error)")
                throw error
            }
        }
    }

    @Test("the feed follower tells an identifier's erasure from its person's, also when the person was erased before it reads the feed")
    func followerTellsErasuresApart() async throws {
        final class Sink: IdentityChangeSink {
            let applied = Mutex<[IdentityChange]>([])
            let cursor = Mutex<Int64>(0)
            func identityCursor() throws -> Int64 { cursor.withLock { $0 } }
            func apply(_ changes: [(seq: Int64, change: IdentityChange)], nowMs: Int64) throws {
                applied.withLock { $0 += changes.map(\.change) }
                if let last = changes.last { cursor.withLock { $0 = last.seq } }
            }
        }
        let clock = TestClock()
        try await withIdentity(clock: clock) { identity, client in
            var resolve = IdentityV1.ResolveRequest()
            resolve.identifiers = [identifier("cookie_id", "ck-9"), identifier("email", "eve@example.org")]
            resolve.createIfMissing = true
            let person = try await identity.resolve(resolve).personId
            var erase = IdentityV1.EraseRequest()
            erase.target = .identifier(identifier("cookie_id", "ck-9"))
            _ = try await identity.erase(erase)
            erase.target = .personId(person)
            _ = try await identity.erase(erase)
            let sink = Sink()
            let follower = IdentityFeedFollower(store: sink, identity: client, logger: Logger(label: "t"), clock: clock.read)
            #expect(try await follower.pollOnce() > 0)
            // Before, both read as the person's erasure: by the time the feed was read, the
            // identity service no longer had the person.
            let erasures = sink.applied.withLock { $0 }.filter { $0 != .other }
            #expect(erasures == [.erase(person: person, absorbed: [])], "\(sink.applied.withLock { $0 })")
        }
    }

    @Test("Erase of an id nothing was kept for keeps its tombstone and checkpoints nothing")
    func eraseUnknownIDSkipsSettle() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let service = try makeProfile(directory, clock: clock)
        _ = try await service.traits("someone", ["nickname": .string("x")], at: clock.read())
        // A reader on an older snapshot: a checkpoint could not finish (before, the Erase
        // waited out its 5 s patience for one, then failed).
        let release = try await holdReadSnapshot(directory + "/profile.sqlite")
        defer { release() }
        var erase = ProfileV1.EraseRequest()
        erase.personId = "never-seen"
        let erased = try service.erase(erase)
        #expect(erased.eventsRemoved == 0 && erased.traitsRemoved == 0 && erased.consentsRemoved == 0 && erased.personId == "never-seen")
        #expect(service.store.current("never-seen") == nil)  // erased: nothing is kept for it from now on
        #expect(!service.store.truncation.isOwed)
    }

    @Test("an Erase whose settle failed is settled by the retrier once the reader lets go, with no other call and no identity feed")
    func eraseSettledByRetrierTimed() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let service = try makeProfile(directory, clock: clock)
        let marker = "kudu\(UInt32.random(in: 0...UInt32.max))"
        _ = try await service.traits("victim", ["nickname": .string("\(marker)-nick")], at: clock.read())
        try service.store.settle()
        let release = try await holdReadSnapshot(directory + "/profile.sqlite")
        var erase = ProfileV1.EraseRequest()
        erase.personId = "victim"
        // The rows are deleted; the checkpoints wait 5 s for the reader, then the Erase fails.
        let request = erase
        let failed = try await offPool { () -> Bool in
            do { _ = try service.erase(request); return false } catch { return true }
        }
        #expect(failed)
        #expect(try await service.store.pool.read { try Int.fetchOne($0, sql: "SELECT count(*) FROM trait WHERE person_id = 'victim'") } == 0)
        let files = ["profile.sqlite", "profile.sqlite-wal"]
        let retrier = Task { try await service.store.settleRetrier(interval: .milliseconds(20), logger: Logger(label: "test")).run() }
        defer { retrier.cancel() }
        try await Task.sleep(for: .milliseconds(200))
        #expect(filesContain(marker, in: directory, files: files), "settled while the reader held its snapshot")
        release()
        // Before, without --identity nothing tried again until the next Erase.
        #expect(try await eventually { !filesContain(marker, in: directory, files: files) })
        #expect(!service.store.truncation.isOwed)
    }

    @Test("an erasure from the feed whose checkpoints fail is settled later by the retrier, and the feed goes on meanwhile")
    func feedErasureSettledLaterTimed() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let service = try makeProfile(directory, clock: clock)
        let marker = "tapir\(UInt32.random(in: 0...UInt32.max))"
        _ = try await service.traits("victim", ["nickname": .string("\(marker)-nick")], at: clock.read())
        let files = ["profile.sqlite", "profile.sqlite-wal", "profile-state.sqlite", "profile-state.sqlite-wal"]
        // A reader on an older snapshot of the events file: the erasure's checkpoints cannot finish.
        let release = try await holdReadSnapshot(directory + "/profile.sqlite")
        // Applied; the settle is owed (the poll does not fail for it).
        try service.store.apply([(1, .erase(person: "victim", absorbed: []))], nowMs: clock.read())
        #expect(try service.store.identityCursor() == 1)
        // Still busy: the next change is applied all the same.
        try service.store.apply([(2, .merge(target: "y", sources: ["x"]))], nowMs: clock.read())
        #expect(try service.store.identityCursor() == 2)
        release()
        #expect(filesContain(marker, in: directory, files: files))
        // The service's retrier settles it (before, the feed's next poll did).
        let retrier = Task { try await service.store.settleRetrier(interval: .milliseconds(20), logger: Logger(label: "test")).run() }
        defer { retrier.cancel() }
        #expect(try await eventually { !filesContain(marker, in: directory, files: files) })
    }

    @Test("an unmerge gives the split person back its traits and consent (also those a newer value hid while merged); the feed's erasure of a merged person takes them from the survivor's file")
    func unmergeAndEraseTraitsAndConsent() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let now = clock.read()
        let service = try makeProfile(directory, clock: clock)
        let marker = "quagga\(UInt32.random(in: 0...UInt32.max))"
        _ = try await service.traits("a", ["tier": .string("\(marker)-gold")], at: now - 2 * hour)
        _ = try await service.traits("a", ["city": .string("\(marker)-Paris")], at: now - hour)
        try await service.consent("a", "marketing", .email, true, at: now - 2 * hour, source: "\(marker)-form")
        _ = try await service.traits("b", ["tier": .string("silver"), "nickname": .string("bee")], at: now - hour)
        try await service.consent("b", "marketing", .email, false, at: now - 3 * hour)
        func traits(_ person: String) async throws -> [String: RuleValue] {
            Dictionary(uniqueKeysWithValues: try await service.profile(person).traits.compactMap { t in t.value.flatMap(RuleValue.init).map { (t.name, $0) } })
        }
        func granted(_ person: String) async throws -> [Bool] { try await service.profile(person).consent.map(\.granted) }

        // Merged: the newest per name, a's consent newer than b's denial.
        try service.store.apply([(1, .merge(target: "b", sources: ["a"]))], nowMs: now)
        #expect(try await traits("b") == ["tier": .string("silver"), "nickname": .string("bee"),
                                          "city": .string("\(marker)-Paris")])
        #expect(try await granted("b") == [true])
        // A value older than the one a merge brought is stale: not b's current one, but b's own
        // (newer than b's own, none), which b keeps once a leaves (before the review, it was dropped).
        #expect(try await service.traits("b", ["city": .string("Lyon")], at: now - 90 * 60 * 1000).stale == ["city"])
        #expect(try await traits("b")["city"] == .string("\(marker)-Paris"))
        // Written through a's id while merged: b's profile, kept as a's (as a's events are).
        #expect(try await service.traits("a", ["pet": .string("\(marker)-cat")], at: now).personId == "b")
        try await service.consent("a", "texts", .sms, true, at: now, source: "\(marker)-sms")
        #expect(try await traits("b")["pet"] == .string("\(marker)-cat"))
        #expect(try await granted("b") == [true, true])

        // Unmerged: each gets its own back, a its tier too, which b's newer one had hidden.
        // Before, a's traits and consent all stayed with b, and a's hidden tier was gone.
        try service.store.apply([(2, .unmerge(survivor: "b", split: "a"))], nowMs: now)
        #expect(try await traits("a") == ["tier": .string("\(marker)-gold"), "city": .string("\(marker)-Paris"), "pet": .string("\(marker)-cat")])
        #expect(try await traits("b") == ["tier": .string("silver"), "nickname": .string("bee"), "city": .string("Lyon")])
        #expect(try await granted("a") == [true, true])
        #expect(try await granted("b") == [false])

        // Merged again, then a erased by the feed: nothing of a stays in b's profile or the files.
        try service.store.apply([(3, .merge(target: "b", sources: ["a"])), (4, .erase(person: "a", absorbed: []))], nowMs: now)
        #expect(try await traits("b") == ["tier": .string("silver"), "nickname": .string("bee"), "city": .string("Lyon")])
        #expect(try await granted("b") == [false])
        #expect(!filesContain(marker, in: directory, files: ["profile.sqlite", "profile.sqlite-wal"]))
    }

    @Test("after Erase no event, trait or consent of the person is in the SQLite files")
    func eraseLeavesNothing() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let service = try makeProfile(directory, clock: clock)
        try service.define(feature("pages", "view", .distinctCount, property: "page"))
        let marker = "okapi\(UInt32.random(in: 0...UInt32.max))"
        let victim = "victim"  // an erased id stays, as its tombstone: not the marker
        let now = clock.read()
        _ = try await service.track((0..<20).map { event("\(marker)-ev\($0)", victim, "view", at: now, ["page": .string("\(marker)-page\($0)")]) })
        _ = try await service.track([event("keep-1", "keeper", "view", at: now, ["page": .string("home")])])
        _ = try await service.traits(victim, ["nickname": .string("\(marker)-nick")], at: now)
        try await service.consent(victim, "marketing", .email, true, at: now, source: "\(marker)-form")
        let files = ["profile.sqlite", "profile.sqlite-wal", "profile-state.sqlite", "profile-state.sqlite-wal"]
        try service.store.flush()  // the victim's feature state in the state file too
        let stateRows = { try service.store.statePool.read { db in
            try Int.fetchOne(db, sql: "SELECT count(*) FROM person_state WHERE person_id = ?", arguments: [victim]) } }
        #expect(try stateRows() == 1)
        // Of its distinct pages, the state holds only their hashes (before: the pages).
        #expect(!filesContain(marker, in: directory, files: ["profile-state.sqlite", "profile-state.sqlite-wal"]))
        #expect(filesContain(marker, in: directory, files: files))

        var request = ProfileV1.EraseRequest()
        request.personId = victim
        let erased = try service.erase(request)
        #expect(erased.eventsRemoved == 20 && erased.traitsRemoved == 1 && erased.consentsRemoved == 1)
        #expect(!filesContain(marker, in: directory, files: files))
        #expect(try stateRows() == 0)
        await #expect(throws: RPCError.self) { _ = try await service.profile(victim) }
        #expect(try await service.features("keeper") == ["pages": 1])
    }

    @Test("a state file that keeps failing is flushed again after a backoff, not at every Track; a success ends it")
    func flushBackoff() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let service = try makeProfile(directory, clock: clock, flushThreshold: 2)
        try service.define(feature("views", "view", .count))
        let states = try DatabaseQueue(path: directory + "/profile-state.sqlite")
        try await states.write { try $0.execute(sql: "CREATE TRIGGER test_fail BEFORE INSERT ON person_state BEGIN SELECT RAISE(FAIL, 'test'); END") }
        let failures: @Sendable () -> Int = { service.store.memory.withLock { $0.flushFailures } }
        _ = try await service.track([event("e1", "a", "view", at: clock.read()), event("e2", "b", "view", at: clock.read())])
        #expect(try await eventually { failures() == 1 && !service.store.memory.withLock { $0.flushRunning } })
        // Within the backoff (1 s from the failure), more Tracks start no flush (before, each
        // started one that failed). On a machine too loaded to finish them within it, nothing
        // can be concluded. (Timed from the failure, not from when this test saw it: a loaded
        // run once saw it late, and the backoff ended during the Tracks.)
        let retryAt = service.store.memory.withLock { $0.flushRetryAt }
        for n in 0..<5 { _ = try await service.track([event("f\(n)", "p\(n)", "view", at: clock.read())]) }
        try await Task.sleep(for: .milliseconds(200))
        if let retryAt, ContinuousClock.now < retryAt { #expect(failures() == 1) }
        // The file works again: the first flush due once the backoff has passed (a flush
        // starts at a Track's commit: Tracks go on meanwhile) writes every state. (On a loaded
        // machine the backoff may have grown meanwhile: waited for, not assumed.)
        try await states.write { try $0.execute(sql: "DROP TRIGGER test_fail") }
        #expect(try await eventually(130) {
            _ = try await service.track([event(UUID().uuidString, "q", "view", at: clock.read())])
            try await Task.sleep(for: .milliseconds(100))
            return failures() == 0
        })
        #expect(try await states.read { try Int.fetchOne($0, sql: "SELECT count(*) FROM person_state WHERE person_id = 'p3'") } == 1)
    }

    @Test("an erasure from the feed whose checkpoint failed is settled by the retrier, with no change to come")
    func erasureSettledLater() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let now = clock.read()
        let service = try makeProfile(directory, clock: clock)
        try service.define(feature("pages", "view", .distinctCount, property: "page"))
        let marker = "gnu\(UInt32.random(in: 0...UInt32.max))"
        let victim = "victim-\(marker)"  // the state file holds the id (and only hashes of the pages)
        _ = try await service.track([event("v1", victim, "view", at: now, ["page": .string(marker)])])
        try service.store.settle()  // the victim's state, under its id, in profile-state.sqlite
        let files = ["profile-state.sqlite", "profile-state.sqlite-wal"]
        #expect(filesContain(marker, in: directory, files: files))

        // A reader holding a snapshot of the state file makes its checkpoint fail (after 1 s).
        let reader = try DatabaseQueue(path: directory + "/profile-state.sqlite")
        let release = try holdOnThread { done in
            try reader.read { db in
                _ = try Int.fetchOne(db, sql: "SELECT count(*) FROM person_state")
                done()
            }
        }
        // Off the cooperative pool: the checkpoint retries for 1 s. The erasure is applied and
        // the poll succeeds (its settle is owed, not a failure of the feed).
        try await offPool { try service.store.apply([(1, .erase(person: victim, absorbed: []))], nowMs: now) }
        #expect(try service.store.identityCursor() == 1)
        #expect(filesContain(marker, in: directory, files: files))  // deleted, not yet checkpointed away
        release()
        // The feed has moved on past the erasure, and on a quiet system brings no change: the
        // service's retrier settles it (before, the feed's next poll did).
        let retrier = Task { try await service.store.settleRetrier(interval: .milliseconds(20), logger: Logger(label: "test")).run() }
        defer { retrier.cancel() }
        #expect(try await eventually { !filesContain(marker, in: directory, files: files) })
    }

    @Test("the feed's erasure of a person whose events a merge gave another person recomputes that person without them")
    func eraseMergedOrigin() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let now = clock.read()
        let service = try makeProfile(directory, clock: clock)
        try service.define(feature("views", "view", .count))
        _ = try await service.track((0..<3).map { event("a\($0)", "a", "view", at: now) } + (0..<2).map { event("b\($0)", "b", "view", at: now) })
        try service.store.apply([(1, .merge(target: "b", sources: ["a"]))], nowMs: now)
        #expect(try await service.features("b") == ["views": 5])
        try service.store.apply([(2, .erase(person: "a", absorbed: []))], nowMs: now)
        #expect(try await service.features("b") == ["views": 2])
        // And after a restart (the states in the file agree).
        try service.store.flush()
        #expect(try await makeProfile(directory, clock: clock).features("b") == ["views": 2])
    }

    @Test("Erase of an id merged away erases the person it was merged into, with everything it absorbed, and says which")
    func eraseAbsorbedID() async throws {
        let directory = temporaryDirectory("profile-test")
        let clock = TestClock()
        let now = clock.read()
        do {
            let service = try makeProfile(directory, clock: clock)
            try service.define(feature("views", "view", .count))
            _ = try await service.track([event("a1", "a", "view", at: now), event("b1", "b", "view", at: now), event("c1", "c", "view", at: now)])
            _ = try await service.traits("a", ["tier": .string("gold")], at: now)
            try await service.consent("a", "marketing", .email, true, at: now)
            _ = try await service.traits("b", ["city": .string("Lyon")], at: now)
            try service.store.apply([(1, .merge(target: "b", sources: ["a"])), (2, .merge(target: "c", sources: ["b"]))], nowMs: now)
            // a's id reads c's profile now: before, Erase(a) deleted a's events only and left a's
            // traits and consent, and c's own data, in the profile a's id still reads.
            var request = ProfileV1.EraseRequest()
            request.personId = "a"
            let erased = try service.erase(request)
            #expect(erased.personId == "c" && erased.eventsRemoved == 3 && erased.traitsRemoved == 2 && erased.consentsRemoved == 1, "\(erased)")
            for person in ["a", "b", "c"] {
                await #expect(throws: RPCError(.notFound, "person: person \(person) was erased")) { _ = try await service.profile(person) }
            }
            // Again (a retry): nothing is left to erase, and the answer names the person as the
            // first did (before: "a", and a's tombstone was rewritten).
            let again = try service.erase(request)
            #expect(again.personId == "c" && again.eventsRemoved == 0 && again.traitsRemoved == 0 && again.consentsRemoved == 0, "\(again)")
            #expect(service.store.gone.withLock { $0["a"] } == "b")
        }
        let service = try makeProfile(directory, clock: clock)
        let refused = try await service.track([event("a-late", "a", "view", at: now)])
        #expect(refused.accepted == 0 && refused.rejections.first?.reason == "person: person a was erased", "\(refused)")
        let rows = try await service.store.pool.read { db in
            try Int.fetchOne(db, sql: "SELECT (SELECT count(*) FROM event) + (SELECT count(*) FROM event_tail) + (SELECT count(*) FROM trait) + (SELECT count(*) FROM consent)")
        }
        #expect(rows == 0)
    }
}
