import Contracts
import Dispatch
import Foundation
import GRDB
import Logging
import IdentityFeed
import RPC
import Rules
import Storage
import Synchronization

/// Profiles in SQLite, in two files. `profile.sqlite` holds the events (the source of
/// truth, kept for backfills, merges and splits), traits with provenance, consent with its
/// full history, and the definitions of features and segments. `profile-state.sqlite`
/// holds one feature-state row per person, maintained incrementally from the events.
/// Writes to each file are serialized by SQLite's single writer; the feature and segment
/// definitions live in memory too, changed only on the event file's writer.
///
/// Database access is synchronous on the calling thread (the service runs its handlers
/// on the concurrent pool, never on an event loop).
///
/// Feature state is written behind, by its own writer: Track folds new events into the
/// person's state in memory (`dirty`) and logs the person in `dirty_person` in the same
/// transaction as the events (an append, cheap). Once `flushThreshold` persons are dirty,
/// they move to `flushing` and a flush writes them to the state file on a queue of its
/// own, while Track goes on; after that commit their `dirty_person` rows are deleted by the
/// next event-file write. The invariant: a person whose row in the state file may lag their
/// events is in `dirty_person`; at start those persons are recomputed from their events.
/// Readers look in memory (dirty, flushing, clean) first, then in the state file. States
/// written by a flush stay in memory as clean copies (up to `cachePersons`). Merges,
/// splits and erasure recompute the persons they touch into `dirty` like Track does (an
/// erased person's state is an empty state, which a flush deletes); erasure then flushes at
/// once and checkpoints both files. A backfill logs the persons it rewrites in the same
/// durable transaction as the definition, then rewrites their states in the state file.
///
/// Track appends events to `event_tail`, which has no index by person: a random insert into
/// the person index writes a page per event at each commit, which cost Track 30–44 % of its
/// throughput (measured by dropping the index). Once `tailEvents` events wait there, they move to `event` in one transaction,
/// so each page of `event`'s indexes is written once per move. `event` keeps events in arrival
/// order (appended) and finds them by id through an index of ids alone (v8: keyed by id, a
/// move inserted whole events at random places: see BENCHMARKS.md, 2026-12-04 08:49).
/// Everything that reads events by person (merges, splits, erasure, backfills, recovery)
/// moves the tail first, on the event file's writer, so it reads `event` alone.
public final class ProfileStore: Sendable {
    /// `profile.sqlite`: events, traits, consent, definitions, `dirty_person`.
    let pool: DatabasePool
    /// `profile-state.sqlite`: `person_state`, written only by flushes, recovery and backfills.
    let statePool: DatabasePool
    /// Keep each WAL short from connections of their own (see BackgroundCheckpointer).
    let checkpointers: [BackgroundCheckpointer]
    let definitions: Mutex<Definitions>
    let memory: Mutex<StateMemory>
    /// Persons the identity feed merged into another (→ that person) or that were erased
    /// (→ ""), as `person_gone` holds them. Chains are followed when read (`current`), so a
    /// person an unmerge brings back brings back the persons it had absorbed.
    let gone: Mutex<[String: String]>
    /// Traits and current consent in memory (see `FactsMemory`).
    let facts: Mutex<FactsMemory>
    /// Flushes run here, one at a time. Nothing on it waits for the event file's writer, so
    /// the writer may wait for it.
    let flushQueue = DispatchQueue(label: "arbiter.profile.flush")
    /// An erasure's settle (`settle`: its states written, both WALs truncated) not done yet.
    /// None at start: the store truncates both WALs as it opens.
    let truncation = OwedTruncation(owed: false)
    /// Dirty persons that start a flush. Default 50,000.
    public let flushThreshold: Int
    /// Clean states kept in memory. Default 100,000.
    public let cachePersons: Int
    /// What the clean states may take, estimated (`approximateBytes`). Default 512 MiB.
    public let cacheBytes: Int
    /// Persons whose traits and current consent are kept in memory. Default 100,000.
    public let factsPersons: Int
    /// Events kept in `event_tail` before they move to `event` (`defaultTailEvents`).
    public let tailEvents: Int
    /// 25,000. A move holds the event file's writer for about 10 µs an event (on the 2-core
    /// machine), so Track calls arriving meanwhile wait up to ~250 ms; a larger tail writes
    /// fewer pages per event and waits longer (`arbiter-bench profile --tail-events`).
    public static let defaultTailEvents = 25_000
    let logger: Logger

    struct Definitions: Sendable {
        var features: [String: FeatureSpec] = [:]
        var byEventType: [String: [FeatureSpec]] = [:]
        var segments: [(name: String, rule: Rule)] = []
        /// The latest `countsFromMs` of the features: no event is stored as received before it.
        var countingFromMs: Int64 = 0
        /// The latest arrival time stored: a feature defined without backfill counts from
        /// after it. With the floor above, on the event file's writer both, an event counts
        /// for a feature exactly when it was stored after the feature was defined, live and
        /// when recomputed (each clock is read before the writer is taken, so by times alone
        /// an event could be folded live and not when recomputed, or the other way round).
        var lastReceivedAtMs: Int64 = 0

        mutating func set(_ spec: FeatureSpec) {
            features[spec.name] = spec
            byEventType = Dictionary(grouping: features.values.sorted { $0.name < $1.name }, by: \.definition.eventType)
            countingFromMs = max(countingFromMs, spec.countsFromMs)
        }
    }

    /// Feature states in memory. An empty state (no events) stands for a deleted one.
    struct StateMemory: Sendable {
        /// Newer than the state file, by person; changed on the event file's writer only.
        var dirty: [String: ProfileStoreV1.PersonState] = [:]
        /// Being written by the running flush.
        var flushing: [String: ProfileStoreV1.PersonState] = [:]
        var flushRunning = false
        /// Flushes failed in a row, and when the next may start: a state file that keeps
        /// failing is tried again after 1 s, 2 s, … up to a minute, not at every Track.
        var flushFailures = 0
        var flushRetryAt: ContinuousClock.Instant?
        /// Equal to the state file (at most `cachePersons`, and `cacheBytes` by
        /// `approximateBytes`); an empty state: the file has none. Changed through `setClean`
        /// and `dropClean`, which keep `cleanBytes`.
        private(set) var clean: [String: ProfileStoreV1.PersonState] = [:]
        private(set) var cleanBytes = 0
        /// `clean` holds every state of the state file (loaded at start, while they fit): a
        /// person in no memory has no state, and no file is read. Ends when a copy is
        /// dropped for room, or by a backfill.
        var complete = false
        /// Counts the changes of the state file readers may have missed (flushes, backfills):
        /// a reader keeps what it read from the file as a clean copy only if none counted
        /// since it looked in memory (otherwise its snapshot may be older than the file).
        var fileGeneration: UInt64 = 0
        /// The `seq` the next `dirty_person` row gets (rows are numbered here, not by SQLite,
        /// so a number is never reused while a flush may refer to it).
        var nextSeq: Int64 = 1
        /// `dirty_person` rows up to here belong to states a flush has committed.
        var flushedUpTo: Int64 = 0
        /// ... and rows up to here are deleted.
        var prunedUpTo: Int64 = 0
        /// No row is deleted until a restart (a backfill failed after logging its persons).
        var holdLog = false

        /// `dirty` and `clean` sized for what they hold at most (before a flush, and the cache):
        /// a dictionary grows by rehashing every entry in one insert, under this lock, which
        /// GetProfile waits for (in the decision service such a rehash of 98,000 entries
        /// stalled every call for 40–150 ms). Up to `maxPresized` each: a larger setting
        /// grows past that as it fills.
        init(flushThreshold: Int, cachePersons: Int) {
            dirty.reserveCapacity(min(flushThreshold, Self.maxPresized))
            clean.reserveCapacity(min(cachePersons, Self.maxPresized))
        }
        static let maxPresized = 1 << 20

        /// Sets a clean copy; returns the one it replaced.
        @discardableResult
        mutating func setClean(_ person: String, _ state: ProfileStoreV1.PersonState) -> ProfileStoreV1.PersonState? {
            let old = clean.updateValue(state, forKey: person)
            cleanBytes += ProfileStore.approximateBytes(state) - (old.map(ProfileStore.approximateBytes) ?? 0)
            return old
        }

        @discardableResult
        mutating func dropClean(_ person: String) -> ProfileStoreV1.PersonState? {
            guard let old = clean.removeValue(forKey: person) else { return nil }
            cleanBytes -= ProfileStore.approximateBytes(old)
            return old
        }

        /// Drops arbitrary copies (a dictionary's order is effectively random) until at most
        /// `persons` taking at most `bytes` are left; returns them, to be freed outside the lock.
        mutating func trimClean(persons: Int, bytes: Int) -> [ProfileStoreV1.PersonState] {
            var dropped: [ProfileStoreV1.PersonState] = []
            while clean.count > persons || (cleanBytes > bytes && !clean.isEmpty), let key = clean.keys.first {
                dropped.append(dropClean(key)!)
            }
            if !dropped.isEmpty { complete = false }
            return dropped
        }

        /// Forgets every clean copy (they are no longer known to be the file's); returns them.
        mutating func dropAllClean() -> [String: ProfileStoreV1.PersonState] {
            defer { (clean, cleanBytes, complete) = ([:], 0, false) }
            return clean
        }

        /// The newest state in memory (an empty one: none, the file has none either).
        func newest(_ person: String) -> ProfileStoreV1.PersonState? {
            dirty[person] ?? flushing[person] ?? clean[person] ?? (complete ? ProfileStoreV1.PersonState() : nil)
        }

        /// Moves the dirty states to `flushing`; nil when a flush runs or nothing is dirty.
        /// Called on the event file's writer, between transactions: every `dirty_person` row
        /// numbered below `nextSeq` then belongs to a state in the snapshot or already written.
        mutating func beginFlush() -> (states: [String: ProfileStoreV1.PersonState], upTo: Int64)? {
            guard !flushRunning, !dirty.isEmpty else { return nil }
            flushRunning = true
            flushing = dirty
            dirty = Dictionary(minimumCapacity: min(flushing.count, Self.maxPresized))
            return (flushing, nextSeq - 1)
        }
    }

    /// What GetProfile reads of a person besides their feature state: their traits by name,
    /// and the newest consent record per purpose and channel.
    struct Facts: Sendable {
        var traits: [StoredTrait] = []
        var consent: [Consent] = []
        var isEmpty: Bool { traits.isEmpty && consent.isEmpty }
    }

    /// About what `facts` takes in memory (its texts, and a fixed share per entry): what the
    /// caches' byte limits count, not an exact figure.
    static func approximateBytes(_ facts: Facts) -> Int {
        var bytes = 64
        for trait in facts.traits {
            bytes += 96 + trait.name.utf8.count + trait.source.utf8.count
            if case .string(let text) = trait.value { bytes += text.utf8.count }
        }
        for record in facts.consent { bytes += 64 + record.purpose.utf8.count + record.source.utf8.count }
        return bytes
    }

    /// About what `state` takes in memory: a fixed share per feature, bucket and distinct
    /// value, and their texts.
    static func approximateBytes(_ state: ProfileStoreV1.PersonState) -> Int {
        var bytes = 64
        for feature in state.features {
            bytes += 128 + feature.name.utf8.count + feature.lastEventId.utf8.count + 32 * feature.buckets.count
            for value in feature.distinct { bytes += 40 + value.value.utf8.count }
        }
        return bytes
    }

    /// Traits and current consent in memory, so that GetProfile reads no file for them: read
    /// from the event file, they took two-thirds of the profile service's CPU under the
    /// decision benchmark's load.
    ///
    /// While every person with traits or consent fits (`factsPersons`), memory holds them
    /// all (`complete`: loaded at start, kept by every write), and a person it lacks has
    /// none. Once one more would not fit, it holds those last written or read (first in,
    /// first out), and a reader that misses reads the file.
    ///
    /// A write of traits or consent sets its persons' entries after it has committed, while
    /// it still holds the event file's writer, and counts a `generation`. A reader that
    /// missed fills an entry from its snapshot only if no write counted since before that
    /// snapshot began: otherwise the snapshot may be older than a write.
    struct FactsMemory: Sendable {
        var cache: FIFOCache<String, Facts>
        var generation: UInt64 = 0
        var complete = false

        /// The person's facts, or nil when memory does not know them.
        func lookup(_ person: String) -> Facts? {
            cache[person] ?? (complete ? Facts() : nil)
        }

        /// Sets the person's facts (as committed, or read from the file: then none may be kept
        /// too, so that the next read does not look again).
        mutating func keep(_ person: String, _ facts: Facts) {
            if cache.insert(person, facts) {
                complete = false  // someone was forgotten: a miss is no longer an answer
            }
        }
    }

    /// - Parameters:
    ///   - flushThreshold: dirty persons kept in memory before their states are written
    ///     together (bounds memory and the recomputation after a crash).
    ///   - cachePersons: clean states kept in memory after a flush (0: none), taking at most
    ///     `cacheBytes` (estimated: `approximateBytes`).
    ///   - factsPersons: persons whose traits and current consent are kept in memory (0: none),
    ///     taking at most `factsBytes` (estimated).
    ///   - tailEvents: events appended to `event_tail` before they move to `event` together
    ///     (bounds the move's transaction and the work of the next merge or erasure).
    public init(directory: String, flushThreshold: Int = 50_000, cachePersons: Int = 100_000, cacheBytes: Int = 512 << 20,
                factsPersons: Int = 100_000, factsBytes: Int = 256 << 20,
                tailEvents: Int = defaultTailEvents, logger: Logger = Logger(label: "arbiter.profile.store")) throws {
        self.flushThreshold = max(1, flushThreshold)
        self.cachePersons = max(0, cachePersons)
        self.cacheBytes = max(0, cacheBytes)
        self.factsPersons = max(0, factsPersons)
        facts = Mutex(FactsMemory(cache: FIFOCache(capacity: self.factsPersons, costLimit: max(0, factsBytes), cost: Self.approximateBytes)))
        self.tailEvents = max(1, tailEvents)
        self.logger = logger
        // FULL: a flush's commit is on disk before the next event-file write deletes its
        // persons' log rows (with NORMAL a power loss could keep the deletion and lose the flush).
        // One fsync per flush of thousands of states.
        let (states, stateCheckpointer) = try SQLiteStore.openWithCheckpointer(directory: directory, name: "profile-state",
                                                                                migrator: Self.stateMigrator, synchronous: .full)
        // Readers of the event file see the state file too (`state.person_state`): GetProfile
        // reads both in one transaction.
        let (events, eventCheckpointer) = try SQLiteStore.openWithCheckpointer(directory: directory, name: "profile", migrator: Self.migrator,
                                                                                readersAttach: ["state": states.path])
        (pool, statePool, checkpointers) = (events, states, [eventCheckpointer, stateCheckpointer])
        var loaded = Definitions()
        try pool.read { db in
            for row in try Row.fetchAll(db, sql: "SELECT definition, version, counts_from_ms, backfilled FROM feature") {
                let definition = try ProfileV1.FeatureDefinition(serializedBytes: [UInt8](row["definition"] as Data))
                loaded.set(try FeatureSpec(definition, version: UInt32(row["version"] as Int64), countsFromMs: row["counts_from_ms"],
                                           backfilled: row["backfilled"]))
            }
            for row in try Row.fetchAll(db, sql: "SELECT name, rule FROM segment ORDER BY name") {
                loaded.segments.append((row["name"], try Rule(row["rule"])))
            }
            // Events are stored in arrival order: the last of `event` and the tail's latest.
            loaded.lastReceivedAtMs = max(try Int64.fetchOne(db, sql: "SELECT received_ms FROM event ORDER BY seq DESC LIMIT 1") ?? 0,
                                          try Int64.fetchOne(db, sql: "SELECT max(received_ms) FROM event_tail") ?? 0)
        }
        definitions = Mutex(loaded)
        gone = Mutex(try pool.read { db in
            Dictionary(try Row.fetchAll(db, sql: "SELECT person_id, target FROM person_gone").map { ($0["person_id"] as String, $0["target"] as String) },
                       uniquingKeysWith: { a, _ in a })
        })
        memory = Mutex(StateMemory(flushThreshold: self.flushThreshold, cachePersons: self.cachePersons))
        if self.factsPersons > 0, let all = try pool.read({ try Self.allFacts($0, upTo: self.factsPersons, bytes: factsBytes) }) {
            facts.withLock { memory in
                memory.complete = true
                for (person, known) in all { memory.keep(person, known) }  // past factsBytes: no longer complete
            }
        }
        // A state file that is new (or was lost) beside stored events: every state is rebuilt.
        if try statePool.read({ db in try !Bool.fetchOne(db, sql: "SELECT EXISTS (SELECT 1 FROM person_state)")! }) {
            try pool.write { db in
                try Self.moveTail(db)
                try db.execute(sql: "INSERT INTO dirty_person (person_id) SELECT DISTINCT person_id FROM event WHERE true")
            }
        }
        try recoverDirty(nowMs: Int64(Date().timeIntervalSince1970 * 1000))
        // Every state in memory, when they fit: no GetProfile or Track reads the state file.
        if self.cachePersons > 0, let all = try statePool.read({ try Self.allStates($0, upTo: self.cachePersons, bytes: self.cacheBytes) }) {
            memory.withLock { m in
                for (person, state) in all { m.setClean(person, state) }
                m.complete = true
                _ = m.trimClean(persons: self.cachePersons, bytes: self.cacheBytes)  // past cacheBytes: no longer complete
            }
        }
    }

    /// Every state in `db` (the state file), or nil when there are more than `limit`.
    static func allStates(_ db: Database, upTo limit: Int, bytes: Int = .max) throws -> [String: ProfileStoreV1.PersonState]? {
        var all: [String: ProfileStoreV1.PersonState] = [:]
        all.reserveCapacity(min(limit, StateMemory.maxPresized))
        var taken = 0
        let rows = try Row.fetchCursor(db, sql: "SELECT person_id, state FROM person_state")
        while let row = try rows.next() {
            guard all.count < limit else { return nil }
            let state = try ProfileStoreV1.PersonState(serializedBytes: row[1] as Data)
            taken += approximateBytes(state)
            guard taken <= bytes else { return nil }  // read no further than memory would keep
            all[row[0]] = state
        }
        return all
    }

    /// Recomputes from their events the persons whose state had not reached the state file
    /// when the process stopped, writes them, and only then empties the log.
    /// In slices of `recoverySlice` persons, read through a cursor, so memory stays bounded
    /// when everyone is logged (after the v3 migration, a lost state file or a failed backfill).
    func recoverDirty(nowMs: Int64, recoverySlice: Int = 10_000) throws {
        let specs = definitions.withLock { $0.byEventType }
        let anyDirty = try pool.read { db in try Bool.fetchOne(db, sql: "SELECT EXISTS (SELECT 1 FROM dirty_person)") ?? false }
        guard anyDirty else {
            // A settle cut short by a crash (its flush done, its checkpoints not) leaves an
            // erasure's rows in old WAL frames, and no dirty person to say so: truncate both
            // WALs at every start.
            try SQLiteStore.checkpoint(statePool)
            try SQLiteStore.checkpoint(pool)
            return
        }
        try pool.write { db in try Self.moveTail(db) }  // their events are read by person
        // The persons read through a cursor (SQLite sorts them, in its temporary storage),
        // not all at once: after a lost state file every person is logged.
        try pool.read { db in
            let persons = try String.fetchCursor(db, sql: "SELECT DISTINCT person_id FROM dirty_person ORDER BY person_id")
            var slice: [String] = []
            slice.reserveCapacity(recoverySlice)
            func write() throws {
                let states = try slice.map { ($0, try Self.recompute(db, $0, specs: specs, now: nowMs)) }
                try statePool.write { states_ in
                    for (person, state) in states { try Self.saveState(states_, person, state) }
                }
                slice.removeAll(keepingCapacity: true)
            }
            while let person = try persons.next() {
                slice.append(person)
                if slice.count == recoverySlice { try write() }
            }
            if !slice.isEmpty { try write() }
        }
        try pool.write { db in try db.execute(sql: "DELETE FROM dirty_person") }
        // An erasure may have been among them: no copy of it stays in either WAL.
        try SQLiteStore.checkpoint(statePool)
        try SQLiteStore.checkpoint(pool)
    }

    // MARK: - Writing states behind

    /// Logs `persons` in `dirty_person` (in the caller's transaction on the event file), and
    /// first deletes the rows whose states a flush has committed. Returns the memory's
    /// counters to set once the transaction has committed.
    func logDirty(_ db: Database, _ persons: some Collection<String>) throws -> (nextSeq: Int64, prunedUpTo: Int64) {
        var (next, flushed, pruned, hold) = memory.withLock { ($0.nextSeq, $0.flushedUpTo, $0.prunedUpTo, $0.holdLog) }
        if flushed > pruned && !hold {
            try db.execute(sql: "DELETE FROM dirty_person WHERE seq <= ?", arguments: [flushed])
            pruned = flushed
        }
        let log = try db.cachedStatement(sql: "INSERT INTO dirty_person (seq, person_id) VALUES (?, ?)")
        for person in persons {
            try log.execute(arguments: [next, person])
            next += 1
        }
        return (next, pruned)
    }

    /// Runs `body` in a transaction on the event file, with every event in `event` (the tail
    /// moved first); the states it returns (an empty state: deleted) are logged as dirty in
    /// that transaction and, once it has committed, replace the persons' states in memory.
    /// Starts a flush when enough persons are dirty.
    func rewriting<T>(_ body: (Database) throws -> (T, [String: ProfileStoreV1.PersonState]),
                      afterCommit: () -> Void = {}) throws -> T {
        try pool.writeWithoutTransaction { db in
            var result: T?
            var states: [String: ProfileStoreV1.PersonState] = [:]
            var counters: (nextSeq: Int64, prunedUpTo: Int64)?
            var touched: [(person: String, facts: Facts)] = []
            try db.inTransaction {
                try Self.moveTail(db)
                (result, states) = try body(db)
                counters = try logDirty(db, states.keys)
                // Their traits and consent may have moved or gone too.
                touched = try states.keys.map { (person: $0, facts: try Self.readFacts(db, $0)) }
                return .commit
            }
            // Committed; no other writer of the event file runs before this.
            memory.withLock { m in
                (m.nextSeq, m.prunedUpTo) = counters!
                for (person, state) in states {
                    m.dirty[person] = state
                    m.dropClean(person)
                }
            }
            factsChanged(touched)
            afterCommit()
            flushIfDue()
            return result!
        }
    }

    /// Starts a flush when `flushThreshold` persons are dirty. When one is still running and
    /// twice as many are dirty, waits for it first (this bounds the memory). Call on the
    /// event file's writer, after a commit.
    func flushIfDue() {
        let (count, running, retryAt) = memory.withLock { ($0.dirty.count, $0.flushRunning, $0.flushRetryAt) }
        guard count >= flushThreshold else { return }
        if let retryAt, ContinuousClock.now < retryAt { return }  // backing off after failures
        if running {
            guard count >= 2 * flushThreshold else { return }
            flushQueue.sync {}
        }
        guard let start = memory.withLock({ $0.beginFlush() }) else { return }
        flushQueue.async { [self] in try? writeFlush(start.states, upTo: start.upTo) }
    }

    /// Writes a flush's states to the state file (deleting empty ones) and makes them clean
    /// copies; on failure they go back to `dirty` (their `dirty_person` rows stay) and the
    /// next flush writes them. Runs on `flushQueue`.
    func writeFlush(_ states: [String: ProfileStoreV1.PersonState], upTo seq: Int64) throws {
        do {
            try statePool.write { db in
                for (person, state) in states.sorted(by: { $0.key < $1.key }) { try Self.saveState(db, person, state) }
            }
        } catch {
            memory.withLock { m in
                m.dirty.merge(m.flushing) { newer, _ in newer }
                m.flushing = [:]
                m.flushRunning = false
                m.flushFailures += 1
                m.flushRetryAt = ContinuousClock.now + .seconds(min(60, 1 << min(m.flushFailures - 1, 6)))
            }
            logger.error("profile: writing \(states.count) feature states failed (retried with the next flush): \(error)")
            throw error
        }
        memory.withLock { $0.fileGeneration += 1 }
        if cachePersons > 0 {
            // In slices, so readers never wait long for the lock (they find these states in
            // `flushing` meanwhile); the copies replaced are released outside it.
            let written = Array(states)
            for start in stride(from: 0, to: written.count, by: 1000) {
                let replaced = memory.withLock { m in
                    var replaced: [ProfileStoreV1.PersonState] = []
                    replaced.reserveCapacity(1000)
                    for (person, state) in written[start..<min(start + 1000, written.count)] {
                        let old = state.events == 0 ? m.dropClean(person) : m.setClean(person, state)
                        if let old { replaced.append(old) }
                    }
                    // Over the limits: drop arbitrary copies.
                    replaced += m.trimClean(persons: cachePersons, bytes: cacheBytes)
                    return replaced
                }
                _ = replaced
            }
        }
        let done = memory.withLock { m in
            m.flushRunning = false
            m.flushFailures = 0
            m.flushRetryAt = nil
            m.flushedUpTo = max(m.flushedUpTo, seq)
            defer { m.flushing = [:] }
            return m.flushing  // released outside the lock
        }
        _ = done
    }

    /// Waits for a running flush, then writes every dirty state. Call on the event file's
    /// writer: no Track can dirty a state meanwhile.
    func flushOnWriter() throws {
        flushQueue.sync {}
        guard let start = memory.withLock({ $0.beginFlush() }) else { return }
        try flushQueue.sync { try writeFlush(start.states, upTo: start.upTo) }
    }

    /// Writes every dirty state to the state file now, and deletes their `dirty_person` rows.
    public func flush() throws {
        try pool.writeWithoutTransaction { db in
            try flushOnWriter()
            try pruneDirtyLog(db)
        }
    }

    /// Deletes the `dirty_person` rows of committed states now (on the event file's writer).
    func pruneDirtyLog(_ db: Database) throws {
        var counters: (nextSeq: Int64, prunedUpTo: Int64)?
        try db.inTransaction {
            counters = try logDirty(db, [])
            return .commit
        }
        memory.withLock { m in (m.nextSeq, m.prunedUpTo) = counters! }
    }

    /// Waits until no flush runs (tests).
    func waitForFlush() { flushQueue.sync {} }

    /// The state of `person` kept in memory, if any.
    func cachedState(_ person: String) -> ProfileStoreV1.PersonState? {
        memory.withLock { $0.newest(person) }
    }

    /// Keeps a state a reader read from the state file (an empty one: the file had none) as
    /// a clean copy, when the file has not changed since `generation` (read with the miss
    /// in memory, before the read began) and the copies have room.
    func keepClean(_ person: String, _ state: ProfileStoreV1.PersonState, since generation: UInt64) {
        guard cachePersons > 0 else { return }  // flushes keep no copies then: they would go stale
        memory.withLock { m in
            guard m.fileGeneration == generation, m.clean.count < cachePersons,
                  m.cleanBytes + Self.approximateBytes(state) <= cacheBytes, m.newest(person) == nil else { return }
            m.setClean(person, state)
        }
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.execute(sql: """
                CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
                CREATE TABLE feature (
                  name TEXT PRIMARY KEY,
                  version INTEGER NOT NULL,
                  definition BLOB NOT NULL,               -- an encoded arbiter.profile.v1.FeatureDefinition
                  defined_at_ms INTEGER NOT NULL
                ) WITHOUT ROWID;
                CREATE TABLE segment (name TEXT PRIMARY KEY, rule TEXT NOT NULL, defined_at_ms INTEGER NOT NULL) WITHOUT ROWID;
                CREATE TABLE event (
                  event_id TEXT PRIMARY KEY,              -- the idempotency key
                  person_id TEXT NOT NULL,                -- the person the event counts for now
                  origin_person_id TEXT NOT NULL,         -- the person it was tracked for (splits)
                  type TEXT NOT NULL,
                  occurred_at_ms INTEGER NOT NULL,
                  body BLOB NOT NULL                      -- an encoded arbiter.profile.v1.Event
                ) WITHOUT ROWID;
                CREATE INDEX event_by_person ON event(person_id);
                CREATE TABLE person_state (person_id TEXT PRIMARY KEY, state BLOB NOT NULL) WITHOUT ROWID;  -- arbiter.profile.store.v1.PersonState
                CREATE TABLE trait (
                  person_id TEXT NOT NULL,
                  name TEXT NOT NULL,
                  value BLOB NOT NULL,                    -- an encoded arbiter.common.v1.Value
                  source TEXT NOT NULL,
                  updated_at_ms INTEGER NOT NULL,
                  PRIMARY KEY (person_id, name)
                ) WITHOUT ROWID;
                CREATE TABLE consent (
                  id INTEGER PRIMARY KEY,
                  person_id TEXT NOT NULL,
                  purpose TEXT NOT NULL,
                  channel INTEGER NOT NULL,
                  granted INTEGER NOT NULL,
                  source TEXT NOT NULL,
                  at_ms INTEGER NOT NULL
                );
                CREATE INDEX consent_by_person ON consent(person_id, purpose, channel, at_ms);
                """)
        }
        migrator.registerMigration("v2: write-behind feature state") { db in
            // Persons whose person_state may lag their events; recomputed at start.
            try db.execute(sql: "CREATE TABLE dirty_person (seq INTEGER PRIMARY KEY, person_id TEXT NOT NULL)")
        }
        migrator.registerMigration("v3: feature state in its own file") { db in
            // Every person with a state is recomputed from their events into
            // profile-state.sqlite at start (recoverDirty), so nothing is copied across files.
            try db.execute(sql: """
                INSERT INTO dirty_person (person_id) SELECT person_id FROM person_state;
                DROP TABLE person_state;
                """)
        }
        migrator.registerMigration("v4: an append-only tail of new events") { db in
            // Events tracked since the last move, in arrival order; `event` holds the rest
            // (an event is in exactly one of them).
            try db.execute(sql: """
                CREATE TABLE event_tail (
                  seq INTEGER PRIMARY KEY,
                  event_id TEXT NOT NULL UNIQUE,
                  person_id TEXT NOT NULL,
                  origin_person_id TEXT NOT NULL,
                  type TEXT NOT NULL,
                  occurred_at_ms INTEGER NOT NULL,
                  body BLOB NOT NULL
                )
                """)
        }
        migrator.registerMigration("v5: persons merged away or erased") { db in
            // A write for a person the feed merged away goes to its survivor; an erased person
            // gets no new data. (Before, both were stored under the old id, out of every profile.)
            try db.execute(sql: """
                CREATE TABLE person_gone (
                  person_id TEXT PRIMARY KEY,
                  target TEXT NOT NULL                    -- the person it was merged into; '' when erased
                ) WITHOUT ROWID;
                CREATE INDEX person_gone_by_target ON person_gone(target);  -- an unmerge's persons absorbed
                """)
        }
        migrator.registerMigration("v6: whose traits and consent") { db in
            // A merge keeps whose each trait and consent record was ('' : the holder's own), as
            // it does for events, so that an unmerge gives them back and an erasure of that
            // person finds them under the survivor. A person's trait of a name is the newest of
            // its rows (`newestPerName`). Rows from before are the holder's own.
            try db.execute(sql: """
                CREATE TABLE trait_v6 (
                  person_id TEXT NOT NULL,
                  name TEXT NOT NULL,
                  origin_person_id TEXT NOT NULL DEFAULT '',
                  value BLOB NOT NULL,                    -- an encoded arbiter.common.v1.Value
                  source TEXT NOT NULL,
                  updated_at_ms INTEGER NOT NULL,
                  PRIMARY KEY (person_id, name, origin_person_id)
                ) WITHOUT ROWID;
                INSERT INTO trait_v6 (person_id, name, value, source, updated_at_ms)
                  SELECT person_id, name, value, source, updated_at_ms FROM trait;
                DROP TABLE trait;
                ALTER TABLE trait_v6 RENAME TO trait;
                CREATE INDEX trait_by_origin ON trait(origin_person_id) WHERE origin_person_id <> '';
                ALTER TABLE consent ADD COLUMN origin_person_id TEXT NOT NULL DEFAULT '';
                CREATE INDEX consent_by_origin ON consent(origin_person_id) WHERE origin_person_id <> '';
                """)
        }
        migrator.registerMigration("v7: events a merge moved, by origin") { db in
            // An erasure finds the person's events that a merge gave another person without
            // reading every event (queries name the index's condition to use it).
            try db.execute(sql: "CREATE INDEX event_by_origin ON event(origin_person_id) WHERE origin_person_id <> person_id")
        }
        migrator.registerMigration("v8: events in arrival order, found by id through an index") { db in
            // `event` was keyed by event_id: each event moved from the tail went into a random
            // place of a table of whole events. Now they are appended, and only the event_id
            // index (ids alone) takes random inserts. Events stored before keep their id order
            // (nothing reads `seq`). Rewrites every stored event once, in one transaction at the
            // first start: the WAL takes about twice the events' size, and the file keeps the
            // old table's pages as free pages.
            try db.execute(sql: """
                CREATE TABLE event_v8 (
                  seq INTEGER PRIMARY KEY,                -- arrival order
                  event_id TEXT NOT NULL,                 -- the idempotency key (event_by_id)
                  person_id TEXT NOT NULL,                -- the person the event counts for now
                  origin_person_id TEXT NOT NULL,         -- the person it was tracked for (splits)
                  type TEXT NOT NULL,
                  occurred_at_ms INTEGER NOT NULL,
                  body BLOB NOT NULL                      -- an encoded arbiter.profile.v1.Event
                );
                INSERT INTO event_v8 (event_id, person_id, origin_person_id, type, occurred_at_ms, body)
                  SELECT event_id, person_id, origin_person_id, type, occurred_at_ms, body FROM event;
                DROP TABLE event;
                ALTER TABLE event_v8 RENAME TO event;
                CREATE UNIQUE INDEX event_by_id ON event(event_id);
                CREATE INDEX event_by_person ON event(person_id);
                CREATE INDEX event_by_origin ON event(origin_person_id) WHERE origin_person_id <> person_id;
                """)
        }
        migrator.registerMigration("v9: when events arrived, and when a feature starts counting") { db in
            // A feature defined without backfill counts the events received from its
            // definition on, also when a merge, an unmerge or a restart recomputes a person
            // from the stored events (before, those counted every stored event). Events stored
            // before this migration read as received at 0; features defined before it count
            // every event (whether they were backfilled was not kept).
            try db.execute(sql: """
                ALTER TABLE event ADD COLUMN received_ms INTEGER NOT NULL DEFAULT 0;
                ALTER TABLE event_tail ADD COLUMN received_ms INTEGER NOT NULL DEFAULT 0;
                ALTER TABLE feature ADD COLUMN counts_from_ms INTEGER NOT NULL DEFAULT 0;
                """)
        }
        migrator.registerMigration("v10: whether a feature's backfill was done") { db in
            // Features defined before it read as not backfilled: a backfill asked for again runs.
            try db.execute(sql: "ALTER TABLE feature ADD COLUMN backfilled INTEGER NOT NULL DEFAULT 0")
        }
        return migrator
    }

    /// Moves every event of `event_tail` to `event`, in arrival order (reading the tail by its
    /// id index instead costs a lookup per row; one transaction writes each page once either
    /// way). Call on the event file's writer, in a transaction.
    static func moveTail(_ db: Database) throws {
        try db.execute(sql: """
            INSERT INTO event (event_id, person_id, origin_person_id, type, occurred_at_ms, body, received_ms)
            SELECT event_id, person_id, origin_person_id, type, occurred_at_ms, body, received_ms FROM event_tail ORDER BY seq;
            DELETE FROM event_tail;
            """)
    }

    /// `profile-state.sqlite`.
    static var stateMigrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            // state: an encoded arbiter.profile.store.v1.PersonState
            try db.execute(sql: "CREATE TABLE person_state (person_id TEXT PRIMARY KEY, state BLOB NOT NULL) WITHOUT ROWID")
        }
        return migrator
    }

    // MARK: - Definitions

    public var features: [FeatureSpec] { definitions.withLock { $0.features.values.sorted { $0.name < $1.name } } }
    public var segments: [(name: String, rule: Rule)] { definitions.withLock { $0.segments } }

    /// Defines (or redefines) a feature. The same definition again changes nothing; a new
    /// one gets a new version, and state of the old version stops counting. `backfill`
    /// recomputes the feature from every stored event of its type.
    public func define(_ definition: ProfileV1.FeatureDefinition, backfill: Bool, nowMs: Int64) throws -> FeatureSpec {
        let probe = try FeatureSpec(definition)
        return try pool.writeWithoutTransaction { db in
            let (current, count) = definitions.withLock { ($0.features[probe.name], $0.features.count) }
            guard current != nil || count < Self.maxFeatures else {
                throw RPCError(.resourceExhausted, "feature: \(count) features are defined, at most \(Self.maxFeatures); redefine one instead")
            }
            let version = current.map { $0.definition == definition ? $0.version : $0.version + 1 } ?? 1
            // The same definition again changes nothing, also with backfill once one was done (a
            // retry would redo the whole backfill, holding the writer meanwhile), unless a failed
            // backfill left its persons to the next start.
            if let current, current.version == version,
               !backfill || (current.backfilled && !memory.withLock { $0.holdLog }) { return current }
            // Without backfill a new version starts empty: it counts the events received from now
            // on, after every event stored (`Definitions.lastReceivedAtMs`).
            let countsFrom = max(nowMs, definitions.withLock { $0.lastReceivedAtMs } + 1)
            let spec = try FeatureSpec(definition, version: version, countsFromMs: backfill ? 0 : countsFrom, backfilled: backfill)
            // Every state in the state file first (no Track runs while this holds the writer).
            if backfill { try flushOnWriter() }
            // The definition, and for a backfill every person it rewrites logged as dirty, in one
            // transaction made durable at once (a crash or a failure after it leaves those persons
            // to be recomputed from their events, under this definition, at start).
            var counters: (nextSeq: Int64, prunedUpTo: Int64)?
            try db.execute(sql: "PRAGMA synchronous = FULL")
            defer { try? db.execute(sql: "PRAGMA synchronous = NORMAL") }
            try db.inTransaction {
                try db.execute(sql: """
                    INSERT OR REPLACE INTO feature (name, version, definition, defined_at_ms, counts_from_ms, backfilled) VALUES (?, ?, ?, ?, ?, ?)
                    """, arguments: [spec.name, Int64(spec.version), Data(definition.serializedBytes()), nowMs, spec.countsFromMs, backfill])
                if backfill { try Self.moveTail(db) }
                let persons = backfill ? try String.fetchAll(db, sql: "SELECT DISTINCT person_id FROM event WHERE type = ?",
                                                             arguments: [spec.definition.eventType]) : []
                counters = try logDirty(db, persons)
                return .commit
            }
            memory.withLock { m in (m.nextSeq, m.prunedUpTo) = counters! }
            let defined = spec
            if backfill {
                do {
                    try statePool.write { states in try Self.backfill(events: db, states: states, defined, nowMs: nowMs) }
                } catch {
                    // The file has the definition and the logged persons: keep them logged until
                    // a restart recomputes them (their feature undercounts until then).
                    memory.withLock { $0.holdLog = true }
                    definitions.withLock { $0.set(defined) }
                    logger.error("profile: backfilling \(defined.name) failed; its persons are recomputed at the next start: \(error)")
                    throw error
                }
                let dropped = memory.withLock { m in
                    let dropped = m.dropAllClean()
                    m.fileGeneration += 1
                    m.flushedUpTo = max(m.flushedUpTo, m.nextSeq - 1)  // the backfilled states are in the file
                    return dropped
                }
                _ = dropped  // freed outside the lock
            }
            definitions.withLock { $0.set(defined) }
            return spec
        }
    }

    /// The most features and segments that may be defined: every GetProfile evaluates them all.
    public static let maxFeatures = 500
    public static let maxSegments = 500

    /// Defines a segment; `rule` was parsed against the features defined now.
    public func defineSegment(name: String, rule: Rule, nowMs: Int64) throws {
        try pool.writeThenUpdate { db in
            let (known, count) = definitions.withLock { d in (d.segments.contains { $0.name == name }, d.segments.count) }
            guard known || count < Self.maxSegments else {
                throw RPCError(.resourceExhausted, "segment: \(count) segments are defined, at most \(Self.maxSegments); redefine one instead")
            }
            try db.execute(sql: "INSERT OR REPLACE INTO segment (name, rule, defined_at_ms) VALUES (?, ?, ?)",
                           arguments: [name, rule.source, nowMs])
            return ((), { [self] in
                self.definitions.withLock { definitions in
                    definitions.segments.removeAll { $0.name == name }
                    definitions.segments.append((name, rule))
                    definitions.segments.sort { $0.name < $1.name }
                }
            })
        }
    }

    /// Recomputes `spec` for every person with events of its type (read from `events`) in
    /// their states in `states`.
    static func backfill(events db: Database, states: Database, _ spec: FeatureSpec, nowMs: Int64) throws {
        // Folded event by event: a person's events are never all in memory at once.
        func empty() -> ProfileStoreV1.FeatureState {
            var feature = ProfileStoreV1.FeatureState()
            feature.name = spec.name
            feature.version = spec.version
            return feature
        }
        var person: String?
        var feature = empty()
        func flush() throws {
            guard let person else { return }
            var state = try loadState(states, person)
            state.features.removeAll { $0.name == spec.name }
            state.features.append(feature)
            try saveState(states, person, state)
        }
        let cursor = try Row.fetchCursor(db, sql: "SELECT person_id, body, received_ms FROM event WHERE type = ? ORDER BY person_id",
                                         arguments: [spec.definition.eventType])
        while let row = try cursor.next() {
            let owner: String = row["person_id"]
            if owner != person {
                try flush()
                person = owner
                feature = empty()
            }
            let event = try decodeEvent(row["body"], person: owner, receivedAtMs: row["received_ms"])
            if spec.matches(event) { spec.apply(event, to: &feature, now: nowMs) }
        }
        try flush()
    }

    // MARK: - Events

    public struct TrackResult: Sendable, Equatable {
        public enum Outcome: Sendable, Equatable {
            case stored
            /// Its id was seen before.
            case duplicate
            /// Its person was erased while the call was on its way: not stored.
            case personErased
        }
        /// For each event given, in order.
        public var outcomes: [Outcome]
    }

    /// Track's group commit: calls arriving together share one transaction.
    let ingest = GroupCommit<Ingest, TrackResult>(label: "arbiter.profile.track", maxBatch: 32)

    struct Ingest: Sendable {
        var events: [TrackedEvent]
        /// Each event's stored body, encoded before the write (off the single writer).
        var bodies: [Data]
        var nowMs: Int64
    }

    /// Stores `events` (each once: a known `event_id` is a duplicate) and folds the new ones
    /// into their persons' feature state (in memory once committed, written to the file with
    /// the next flush). Calls arriving together share one transaction; this returns once the
    /// transaction holding these events has committed.
    public func track(_ events: [TrackedEvent], nowMs: Int64) async throws -> TrackResult {
        let events = events.map { event in
            var event = event
            event.receivedAtMs = nowMs
            return event
        }
        let ingest = Ingest(events: events, bodies: events.map { Data(Self.encodeEvent($0)) }, nowMs: nowMs)
        return try await self.ingest.submit(ingest) { [self] batch in try write(batch) }
    }

    private func write(_ batch: [Ingest]) throws -> [TrackResult] {
        try pool.writeWithoutTransaction { db in
            let (byType, floor) = definitions.withLock { ($0.byEventType, $0.countingFromMs) }
            var lastReceived: Int64 = 0
            defer { definitions.withLock { $0.lastReceivedAtMs = max($0.lastReceivedAtMs, lastReceived) } }
            var results: [TrackResult] = []
            var updated: [String: ProfileStoreV1.PersonState] = [:]
            var newlyDirty: [String] = []
            var counters: (nextSeq: Int64, prunedUpTo: Int64)?
            try db.inTransaction {
                // New events go to the tail, unless their id is in `event` or the tail already.
                let insert = try db.cachedStatement(sql: """
                    INSERT OR IGNORE INTO event_tail (event_id, person_id, origin_person_id, type, occurred_at_ms, body, received_ms)
                    SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE NOT EXISTS (SELECT 1 FROM event WHERE event_id = ?1)
                    """)
                var perPerson: [[String: [TrackedEvent]]] = []
                // Read on the writer, which the feed's merges and erasures also write on: an
                // event for a person merged away goes to the survivor (and keeps its origin,
                // for an unmerge); one for an erased person is not stored (the service refuses
                // those it sees before; this is one erased while the call was on its way).
                let gone = self.gone.withLock { $0 }
                for entry in batch {
                    var outcomes: [TrackResult.Outcome] = []
                    outcomes.reserveCapacity(entry.events.count)
                    var byPerson: [String: [TrackedEvent]] = [:]
                    for (given, body) in zip(entry.events, entry.bodies) {
                        // Received no earlier than the latest feature's start (see `Definitions`).
                        var event = given
                        event.receivedAtMs = max(event.receivedAtMs, floor)
                        lastReceived = max(lastReceived, event.receivedAtMs)
                        let person = gone.isEmpty ? event.personID : Self.follow(event.personID, in: gone)
                        guard let person else {
                            outcomes.append(.personErased)
                            continue
                        }
                        try insert.run(db, .text(event.eventID), .text(person), .text(event.personID), .text(event.type), .integer(event.occurredAtMs), .blob(body),
                                       .integer(event.receivedAtMs))
                        let isNew = db.changesCount > 0
                        outcomes.append(isNew ? .stored : .duplicate)
                        if isNew { byPerson[person, default: []].append(event) }
                    }
                    perPerson.append(byPerson)
                    results.append(TrackResult(outcomes: outcomes))
                }
                // Each person's newest state: memory first; the others in one read of the state
                // file (no flush is writing a state that is not in memory).
                var missing: [String] = []
                memory.withLock { m in
                    for byPerson in perPerson {
                        for person in byPerson.keys where updated[person] == nil {
                            if let state = m.newest(person) {
                                updated[person] = state
                                if m.dirty[person] == nil { newlyDirty.append(person) }
                            } else {
                                missing.append(person)
                                updated[person] = ProfileStoreV1.PersonState()
                            }
                        }
                    }
                }
                if !missing.isEmpty {
                    try statePool.read { states in
                        for person in missing { updated[person] = try Self.loadState(states, person) }
                    }
                    newlyDirty += missing
                }
                for (entry, byPerson) in zip(batch, perPerson) {
                    for (person, personEvents) in byPerson { Self.fold(personEvents, into: &updated[person]!, specs: byType, now: entry.nowMs) }
                }
                counters = try logDirty(db, newlyDirty)
                // The tail's rows are numbered without gaps since it was last emptied. (Two
                // subqueries: SQLite finds a lone min or max from the b-tree's end, both together
                // by a scan.)
                let tail = try Int.fetchOne(db.cachedStatement(sql: """
                    SELECT (SELECT max(seq) FROM event_tail) - (SELECT min(seq) FROM event_tail) + 1
                    """)) ?? 0
                if tail >= tailEvents { try Self.moveTail(db) }
                return .commit
            }
            // Committed; no other writer of the event file runs before this.
            memory.withLock { m in
                (m.nextSeq, m.prunedUpTo) = counters!
                m.dirty.merge(updated) { _, new in new }
            }
            flushIfDue()
            return results
        }
    }

    /// Adds events to a person's state: seen times, count, and every matching feature.
    static func fold(_ events: [TrackedEvent], into state: inout ProfileStoreV1.PersonState,
                     specs: [String: [FeatureSpec]], now: Int64) {
        for event in events {
            state.events += 1
            let at = event.countedAtMs(now: now)  // as the features count it
            state.firstSeenMs = state.firstSeenMs == 0 ? at : min(state.firstSeenMs, at)
            state.lastSeenMs = max(state.lastSeenMs, at)
            for spec in specs[event.type] ?? [] where spec.matches(event) {
                let i: Int
                if let found = state.features.firstIndex(where: { $0.name == spec.name }) {
                    i = found
                    if state.features[i].version != spec.version {
                        state.features[i] = ProfileStoreV1.FeatureState()
                        state.features[i].name = spec.name
                        state.features[i].version = spec.version
                    }
                } else {
                    var feature = ProfileStoreV1.FeatureState()
                    feature.name = spec.name
                    feature.version = spec.version
                    state.features.append(feature)
                    i = state.features.count - 1
                }
                spec.apply(event, to: &state.features[i], now: now)
            }
        }
    }

    /// A person's whole state rebuilt from the events stored for them in `db` (the event
    /// file); an empty state when there are none.
    static func recompute(_ db: Database, _ person: String, specs: [String: [FeatureSpec]], now: Int64) throws -> ProfileStoreV1.PersonState {
        // Read and folded 1,000 events at a time: a person with millions of events (a shared
        // anonymous id) must not need them all in memory at once, at every restart after a
        // crash among them.
        var state = ProfileStoreV1.PersonState()
        var chunk: [TrackedEvent] = []
        chunk.reserveCapacity(1000)
        let cursor = try Row.fetchCursor(db, sql: "SELECT body, received_ms FROM event WHERE person_id = ? ORDER BY occurred_at_ms", arguments: [person])
        while let row = try cursor.next() {
            chunk.append(try decodeEvent(row["body"], person: person, receivedAtMs: row["received_ms"]))
            if chunk.count == 1000 {
                fold(chunk, into: &state, specs: specs, now: now)
                chunk.removeAll(keepingCapacity: true)
            }
        }
        fold(chunk, into: &state, specs: specs, now: now)
        return state
    }

    /// The person's state in `db` (the state file); an empty state when it has none.
    static func loadState(_ db: Database, _ person: String) throws -> ProfileStoreV1.PersonState {
        guard let data = try Data.fetchOne(db.cachedStatement(sql: "SELECT state FROM person_state WHERE person_id = ?"),
                                           arguments: [person]) else { return ProfileStoreV1.PersonState() }
        return try ProfileStoreV1.PersonState(serializedBytes: data)
    }

    /// Writes the person's state to `db` (the state file); an empty state deletes it.
    static func saveState(_ db: Database, _ person: String, _ state: ProfileStoreV1.PersonState) throws {
        if state.events == 0 {
            try db.cachedStatement(sql: "DELETE FROM person_state WHERE person_id = ?").execute(arguments: [person])
        } else {
            try db.cachedStatement(sql: "INSERT OR REPLACE INTO person_state (person_id, state) VALUES (?, ?)")
                .execute(arguments: [person, Data(state.serializedBytes())])
        }
    }

    static func encodeEvent(_ event: TrackedEvent) -> [UInt8] {
        var wire = ProfileV1.Event()
        wire.eventId = event.eventID
        wire.type = event.type
        wire.occurredAtMs = event.occurredAtMs
        wire.value = event.value
        wire.properties = event.properties.sorted { $0.key < $1.key }.map { CommonV1.Field($0.key, $0.value) }
        return wire.serializedBytes()
    }

    static func decodeEvent(_ body: Data, person: String, receivedAtMs: Int64) throws -> TrackedEvent {
        let wire = try ProfileV1.Event(serializedBytes: body)
        var properties: [String: RuleValue] = [:]
        for field in wire.properties { properties[field.name] = RuleValue(field.value) }
        var event = TrackedEvent(eventID: wire.eventId, personID: person, type: wire.type, occurredAtMs: wire.occurredAtMs,
                                 value: wire.value, properties: properties)
        event.receivedAtMs = receivedAtMs
        return event
    }

    // MARK: - Traits and consent

    public struct StoredTrait: Sendable, Hashable {
        public var name: String
        public var value: RuleValue
        public var source: String
        public var updatedAtMs: Int64
    }

    /// Sets traits of `person`, as given for `origin` ('': for `person` itself; else an id
    /// the feed merged into it, which an unmerge gives them back to). The row of `origin`
    /// keeps the newer of its value and the new one. Returns the names of the traits whose
    /// new value is not the person's current one (stale: it has a newer one, also one a
    /// merge brought).
    public func setTraits(person: String, origin: String = "", _ traits: [(name: String, value: RuleValue)], source: String,
                          updatedAtMs: Int64) throws -> [String] {
        try writingFacts(of: person, origin: origin) { db in
            let countNames = try db.cachedStatement(sql: "SELECT count(DISTINCT name) FROM trait WHERE person_id = ?")
            let before = try Int.fetchOne(countNames, arguments: [person]) ?? 0
            let upsert = try db.cachedStatement(sql: """
                INSERT INTO trait (person_id, name, origin_person_id, value, source, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                ON CONFLICT (person_id, name, origin_person_id) DO UPDATE SET value = ?4, source = ?5, updated_at_ms = ?6
                WHERE excluded.updated_at_ms >= trait.updated_at_ms
                """)
            // A row read after this one (`traitOrder`: time, then the person's own, then origin).
            let newer = try db.cachedStatement(sql: """
                SELECT EXISTS (SELECT 1 FROM trait WHERE person_id = ?1 AND name = ?2 AND (updated_at_ms > ?3 OR (updated_at_ms = ?3
                  AND ((origin_person_id = '') > (?4 = '') OR ((origin_person_id = '') = (?4 = '') AND origin_person_id > ?4)))))
                """)
            var stale: [String] = []
            for (name, value) in traits {
                try upsert.execute(arguments: [person, name, origin, Data(CommonV1.Value(value).serializedBytes()), source, updatedAtMs])
                let written = db.changesCount > 0
                if try !written || Bool.fetchOne(newer, arguments: [person, name, updatedAtMs, origin]) == true { stale.append(name) }
            }
            // Only new traits past the limit are refused: one a merge took past it may still change.
            let count = try Int.fetchOne(countNames, arguments: [person]) ?? 0
            guard count <= max(before, Self.maxTraitsPerPerson) else {
                throw RPCError(.resourceExhausted, "traits: person \(person) would have \(count) traits; at most \(Self.maxTraitsPerPerson)")
            }
            return stale
        }
    }

    public struct Consent: Sendable, Hashable {
        public var purpose: String
        public var channel: Int32
        public var granted: Bool
        public var source: String
        public var atMs: Int64

        public init(purpose: String, channel: Int32, granted: Bool, source: String, atMs: Int64) {
            self.purpose = purpose
            self.channel = channel
            self.granted = granted
            self.source = source
            self.atMs = atMs
        }
    }

    /// Appends consent records to the person's history, as given for `origin` (see `setTraits`).
    /// A record the pair has already (a retried call) is not appended again, unless it would
    /// govern again: see below.
    public func setConsent(person: String, origin: String = "", _ records: [Consent]) throws {
        try writingFacts(of: person, origin: origin) { db in
            let pairsSQL = "SELECT count(*) FROM (SELECT DISTINCT purpose, channel FROM consent WHERE person_id = ?)"
            let before = try Int.fetchOne(db.cachedStatement(sql: pairsSQL), arguments: [person]) ?? 0
            for (i, r) in records.enumerated() {
                // A record the pair has already, given for the same person (an unmerge takes
                // records by whom they were given for), is a retry, and not appended: one
                // probe of consent_by_person. Unless it would govern again: at the time of the
                // pair's newest, which is another (deny, grant, deny in one second: the third
                // withdraws), and not followed in this call by one at its time or later.
                let known = try Bool.fetchOne(db.cachedStatement(sql: """
                    SELECT EXISTS (SELECT 1 FROM consent WHERE person_id = ? AND purpose = ? AND channel = ? AND at_ms = ?
                                   AND granted = ? AND source = ? AND origin_person_id = ?)
                    """), arguments: [person, r.purpose, r.channel, r.atMs, r.granted, r.source, origin]) ?? false
                if known {
                    let supersededHere = records[(i + 1)...].contains { $0.purpose == r.purpose && $0.channel == r.channel && $0.atMs >= r.atMs }
                    let newest = try Self.newestConsent(db, person: person, purpose: r.purpose, channel: Int64(r.channel))
                    guard !supersededHere, let newest, newest.atMs == r.atMs, newest != r else { continue }
                }
                try db.cachedStatement(sql: """
                    INSERT INTO consent (person_id, purpose, channel, granted, source, at_ms, origin_person_id) VALUES (?, ?, ?, ?, ?, ?, ?)
                    """).execute(arguments: [person, r.purpose, r.channel, r.granted, r.source, r.atMs, origin])
            }
            // Only new pairs past the limit are refused. Denials may go further, to a ceiling
            // of their own: withdrawing consent (routing passes unsubscribes on) must stay
            // possible, and the answers must still fit in a message.
            let pairs = try Int.fetchOne(db.cachedStatement(sql: pairsSQL), arguments: [person]) ?? 0
            let denials = records.allSatisfy { !$0.granted }
            let limit = denials ? Self.maxConsentPairsWithDenials : Self.maxConsentPairsPerPerson
            guard pairs <= max(before, limit) else {
                throw RPCError(.resourceExhausted,
                               "consents: person \(person) would have consent for \(pairs) purpose and channel pairs; at most \(Self.maxConsentPairsPerPerson), "
                               + "or \(Self.maxConsentPairsWithDenials) with denials")
            }
        }
    }

    /// The newest record per purpose and channel.
    public func currentConsent(person: String) throws -> [Consent] {
        try pool.read { db in try Self.currentConsent(db, person: person) }
    }

    /// The newest record per purpose and channel, and the newest `limit` records of the
    /// history, oldest first, with whether older ones were left out.
    public func consent(person: String, historyLimit limit: Int) throws -> (current: [Consent], history: [Consent], truncated: Bool) {
        try pool.read { db in
            let current = try Self.currentConsent(db, person: person)
            var history: [Consent] = []
            let rows = try Row.fetchCursor(db.cachedStatement(sql: """
                SELECT purpose, channel, granted, source, at_ms FROM consent WHERE person_id = ? ORDER BY at_ms DESC, purpose DESC, channel DESC, id DESC LIMIT ?
                """), arguments: [person, limit + 1])
            while let row = try rows.next() {
                history.append(Consent(purpose: row[0], channel: row[1], granted: row[2], source: row[3], atMs: row[4]))
            }
            let truncated = history.count > limit
            return (current, Array(history.prefix(limit).reversed()), truncated)
        }
    }

    /// The most distinct traits, and purpose and channel pairs of consent, one person may
    /// have through SetTraits and SetConsent (their answers must fit in a message). A call
    /// that adds past them is refused, but not a change of what the person has (a merge may
    /// have taken them past the limit); a call of denials alone may add pairs up to
    /// `maxConsentPairsWithDenials`.
    public static let maxTraitsPerPerson = 1000
    public static let maxConsentPairsPerPerson = 1000
    /// Pairs a call of denials alone may take a person to.
    public static let maxConsentPairsWithDenials = 2000

    /// The newest record per purpose and channel: a skip scan over `consent_by_person`, two
    /// index probes per pair however long the person's history (it was read whole).
    static func currentConsent(_ db: Database, person: String) throws -> [Consent] {
        let nextPair = try db.cachedStatement(sql: """
            SELECT purpose, channel FROM consent WHERE person_id = ? AND (purpose, channel) > (?, ?)
            ORDER BY purpose, channel LIMIT 1
            """)
        var current: [Consent] = []
        var after: (purpose: String, channel: Int64) = ("", .min)
        while let pair = try Row.fetchOne(nextPair, arguments: [person, after.purpose, after.channel]) {
            after = (pair[0], pair[1])
            if let newest = try newestConsent(db, person: person, purpose: after.purpose, channel: after.channel) {
                current.append(newest)
            }
        }
        return current
    }

    /// The pair's newest record (the last inserted of those at the newest time).
    static func newestConsent(_ db: Database, person: String, purpose: String, channel: Int64) throws -> Consent? {
        try Row.fetchOne(db.cachedStatement(sql: """
            SELECT granted, source, at_ms FROM consent WHERE person_id = ? AND purpose = ? AND channel = ?
            ORDER BY at_ms DESC, id DESC LIMIT 1
            """), arguments: [person, purpose, channel]).map {
            Consent(purpose: purpose, channel: Int32(clamping: channel), granted: $0[0], source: $0[1], atMs: $0[2])
        }
    }

    /// The newest record per purpose and channel of records ordered by purpose, channel and time.
    static func current(_ ordered: [Consent]) -> [Consent] {
        var current: [Consent] = []
        for record in ordered {
            if let last = current.last, last.purpose == record.purpose, last.channel == record.channel {
                current[current.count - 1] = record
            } else {
                current.append(record)
            }
        }
        return current
    }

    // MARK: - Profiles

    public struct Profile: Sendable {
        public var personID: String
        public var traits: [StoredTrait]
        public var features: [(name: String, value: Double)]
        public var segments: [String]
        public var consent: [Consent]
        public var firstSeenMs: Int64
        public var lastSeenMs: Int64
    }

    /// Where a profile was found: in memory (nil: nothing is known about the person), or
    /// not all of it there (`profile(person:nowMs:)` reads the rest from the files).
    public enum MemoryLookup: Sendable {
        case answered(Profile?)
        case readFiles
    }

    /// The person's profile as of `nowMs` when memory holds all of it (their feature state,
    /// traits and consent): it reads no file, so it may run on an event loop.
    public func profileInMemory(person: String, nowMs: Int64) -> MemoryLookup {
        guard let state = cachedState(person), let known = facts.withLock({ $0.lookup(person) }) else { return .readFiles }
        return .answered(compose(person, state, known, nowMs: nowMs))
    }

    /// The person's profile as of `nowMs` (features decayed and windowed now), or nil when
    /// nothing is known about them. Reads the files for what memory does not hold.
    public func profile(person: String, nowMs: Int64) throws -> Profile? {
        // Memory before the file: a state leaves memory only once the file has it.
        let (cached, fileGeneration) = memory.withLock { ($0.newest(person), $0.fileGeneration) }
        let (known, factsGeneration) = facts.withLock { ($0.lookup(person), $0.generation) }
        if let cached, let known { return compose(person, cached, known, nowMs: nowMs) }
        let (state, read) = try SQLiteStore.snapshotRead(pool) { db in
            // `state.person_state`, attached to readers
            (try cached ?? Self.loadState(db, person), try known ?? Self.readFacts(db, person))
        }
        if cached == nil { keepClean(person, state, since: fileGeneration) }
        if known == nil { keepFacts(person, read, since: factsGeneration) }
        return compose(person, state, read, nowMs: nowMs)
    }

    /// A profile from its parts; nil when the person has no event, trait or consent.
    func compose(_ person: String, _ state: ProfileStoreV1.PersonState, _ known: Facts, nowMs: Int64) -> Profile? {
        guard state.events > 0 || !known.traits.isEmpty || !known.consent.isEmpty else { return nil }
        let (specs, segments) = definitions.withLock { ($0.features, $0.segments) }
        let stateByName = Dictionary(state.features.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var features: [(name: String, value: Double)] = []
        var featureValues: [String: Double] = [:]
        for spec in specs.values.sorted(by: { $0.name < $1.name }) {
            if let value = spec.value(stateByName[spec.name], now: nowMs) {
                features.append((spec.name, value))
                featureValues[spec.name] = value
            }
        }
        let traitValues = Dictionary(known.traits.map { ($0.name, $0.value) }, uniquingKeysWith: { a, _ in a })
        let lookup = Self.lookup(traits: traitValues, features: featureValues, consent: known.consent)
        let members = segments.filter { $0.rule.evaluate(lookup) }.map { $0.name }
        return Profile(personID: person, traits: known.traits, features: features, segments: members, consent: known.consent,
                       firstSeenMs: state.firstSeenMs, lastSeenMs: state.lastSeenMs)
    }

    /// The person's traits (by name) and current consent in `db` (the event file).
    static func readFacts(_ db: Database, _ person: String) throws -> Facts {
        // Columns by position: GRDB finds a name by lowercasing every column name.
        var traits: [StoredTrait] = []
        let rows = try Row.fetchCursor(db.cachedStatement(sql: """
            SELECT name, value, source, updated_at_ms FROM trait WHERE person_id = ? ORDER BY \(traitOrder)
            """), arguments: [person])
        while let row = try rows.next() {
            newestPerName(&traits, StoredTrait(name: row[0], value: RuleValue(try CommonV1.Value(serializedBytes: row[1] as Data)) ?? .string(""),
                                               source: row[2], updatedAtMs: row[3]))
        }
        return Facts(traits: traits, consent: try currentConsent(db, person: person))
    }

    /// A person's trait rows by name, oldest first; of equal times the person's own last, so
    /// that it wins (a merge kept the survivor's on a tie).
    static let traitOrder = "name, updated_at_ms, origin_person_id = '', origin_person_id"

    /// Appends `trait`, read in `traitOrder`: a row of the last one's name replaces it (newer).
    static func newestPerName(_ traits: inout [StoredTrait], _ trait: StoredTrait) {
        if traits.last?.name == trait.name { traits[traits.count - 1] = trait } else { traits.append(trait) }
    }

    /// Runs `body` in a transaction on the event file that changes `person`'s traits or
    /// consent (given for `origin`, '' or an id merged into it); once it has committed (still
    /// on the writer) memory holds their new facts.
    func writingFacts<T>(of person: String, origin: String = "", _ body: (Database) throws -> T) throws -> T {
        try pool.writeWithoutTransaction { db in
            // The service mapped the person before the call waited for the writer; a merge,
            // unmerge or erasure the feed applied meanwhile must not get data under the old id.
            guard gone.withLock({ $0[person] == nil && (origin.isEmpty || Self.follow(origin, in: $0) == person) }) else {
                throw RPCError(.aborted, "person: \(origin.isEmpty ? person : origin) was merged, unmerged or erased while this call waited; retry it")
            }
            var result: T?
            var now = Facts()
            try db.inTransaction {
                result = try body(db)
                now = try Self.readFacts(db, person)
                return .commit
            }
            factsChanged([(person: person, facts: now)])
            return result!
        }
    }

    /// Keeps facts a reader read from the event file, when no write of traits or consent
    /// counted since `generation` (read before the read began).
    func keepFacts(_ person: String, _ read: Facts, since generation: UInt64) {
        facts.withLock { if $0.generation == generation { $0.keep(person, read) } }
    }

    /// After a commit that changed traits or consent, on the event file's writer: each
    /// person's facts as committed.
    func factsChanged(_ changes: [(person: String, facts: Facts)]) {
        guard !changes.isEmpty else { return }
        facts.withLock { memory in
            memory.generation += 1
            // None left (erased, merged away): nothing of the person stays in memory.
            for (person, known) in changes {
                if known.isEmpty { memory.cache.remove(person) } else { memory.keep(person, known) }
            }
        }
    }

    /// Every person's traits and current consent in `db` (the event file), or nil when more
    /// than `limit` persons have some (reads stop there).
    static func allFacts(_ db: Database, upTo limit: Int, bytes: Int = .max) throws -> [String: Facts]? {
        var all: [String: Facts] = [:]
        // About what they take (`approximateBytes`, counted per row: at least as much as what
        // is kept): read no further than memory would keep.
        var taken = 0
        let traits = try Row.fetchCursor(db, sql: "SELECT person_id, name, value, source, updated_at_ms FROM trait ORDER BY person_id, \(traitOrder)")
        while let row = try traits.next() {
            let person: String = row[0]
            if all[person] == nil && all.count == limit { return nil }
            taken += 96 + (row[1] as String).utf8.count + (row[3] as String).utf8.count + (row[2] as Data).count
            guard taken <= bytes else { return nil }
            newestPerName(&all[person, default: Facts()].traits,
                          StoredTrait(name: row[1], value: RuleValue(try CommonV1.Value(serializedBytes: row[2] as Data)) ?? .string(""),
                                      source: row[3], updatedAtMs: row[4]))
        }
        let consent = try Row.fetchCursor(db, sql: """
            SELECT person_id, purpose, channel, granted, source, at_ms FROM consent ORDER BY person_id, purpose, channel, at_ms, id
            """)
        var person: String?
        var records: [Consent] = []
        func flush() -> Bool {
            guard let person else { return true }
            if all[person] == nil && all.count == limit { return false }
            all[person, default: Facts()].consent = current(records)
            return true
        }
        while let row = try consent.next() {
            let owner: String = row[0]
            if owner != person {
                guard flush() else { return nil }
                (person, records) = (owner, [])
            }
            records.append(Consent(purpose: row[1], channel: row[2], granted: row[3], source: row[4], atMs: row[5]))
            taken += 64 + records.last!.purpose.utf8.count + records.last!.source.utf8.count
            guard taken <= bytes else { return nil }
        }
        return flush() ? all : nil
    }

    /// How rules read a profile: `trait.<name>`, `feature.<name>`, and `consent.<purpose>`
    /// (the purpose's record for every channel) or `consent.<purpose>.<channel>` (the newer of
    /// the channel's record and that one: `governingConsent`), true when it grants.
    static func lookup(traits: [String: RuleValue], features: [String: Double], consent: [Consent])
        -> (String, String) -> RuleValue? {
        { namespace, name in
            switch namespace {
            case "trait": return traits[name]
            case "feature": return features[name].map(RuleValue.number)
            case "consent":
                if let general = consent.last(where: { $0.channel == 0 && $0.purpose == name }) { return .bool(general.granted) }
                let exact = consent.last { record in
                    record.channel != 0 && name == "\(record.purpose).\(CommonV1.Channel(rawValue: record.channel).ruleName)"
                }
                let general = consent.last { record in
                    record.channel == 0 && name.hasPrefix(record.purpose + ".")
                        && CommonV1.Channel.delivery.contains { $0.ruleName == name.dropFirst(record.purpose.count + 1) }
                }
                return governingConsent(exact: exact, general: general, atMs: \.atMs).map { .bool($0.granted) }
            default: return nil
            }
        }
    }

    // MARK: - Merges, splits and erasure

    /// Applies a merge from the identity change feed: `sources`' events, traits (the newest
    /// per name wins when read) and consent move to `target`, each keeping whose it was;
    /// `target`'s features are recomputed from all the events, as if one person had them from
    /// the start. Adds the new states (the sources' empty) to `states`.
    static func merge(_ db: Database, sources: [String], into target: String, specs: [String: [FeatureSpec]], now: Int64,
                      states: inout [String: ProfileStoreV1.PersonState]) throws {
        for source in sources where source != target {
            try db.execute(sql: "UPDATE event SET person_id = ? WHERE person_id = ?", arguments: [target, source])
            try moveFacts(db, "person_id = ?1", [source], to: target, ownedBy: source)
            states[source] = ProfileStoreV1.PersonState()
        }
        states[target] = try recompute(db, target, specs: specs, now: now)
    }

    /// Applies an unmerge: the events, traits and consent records first tracked for `split`,
    /// or for a person it had absorbed, go back to it, and both persons' features are
    /// recomputed (added to `states`).
    static func split(_ db: Database, _ split: String, from survivor: String, specs: [String: [FeatureSpec]], now: Int64,
                      states: inout [String: ProfileStoreV1.PersonState]) throws {
        // No person has the empty id, and every own row has the empty origin.
        guard !split.isEmpty else { return }
        // The split person comes back with the persons it had absorbed (as the identity
        // service gives their identifiers back): their events go back with it.
        let absorbed = try String.fetchAll(db, sql: """
            WITH RECURSIVE absorbed(person_id) AS (
              SELECT person_id FROM person_gone WHERE target = ?1
              UNION SELECT g.person_id FROM person_gone g JOIN absorbed a ON g.target = a.person_id)
            SELECT person_id FROM absorbed
            """, arguments: [split])
        for origin in [split] + absorbed {
            try db.execute(sql: "UPDATE event SET person_id = ? WHERE person_id = ? AND origin_person_id = ?",
                           arguments: [split, survivor, origin])
            try moveFacts(db, "person_id = ?1 AND origin_person_id = ?2", [survivor, origin], to: split, ownedBy: split)
        }
        states[survivor] = try recompute(db, survivor, specs: specs, now: now)
        states[split] = try recompute(db, split, specs: specs, now: now)
    }

    /// Moves the traits and consent records `condition` selects (SQL over either table, with
    /// `arguments`) to `person`. Each keeps whose it was: `owner`'s own rows become the
    /// holder's own (''), another's name it (a merge's source names itself).
    static func moveFacts(_ db: Database, _ condition: String, _ arguments: [String], to person: String, ownedBy owner: String) throws {
        let n = arguments.count
        let origin = "CASE origin_person_id WHEN ?\(n + 2) THEN '' WHEN '' THEN ?\(n + 2) ELSE origin_person_id END"
        let all = StatementArguments(arguments + [person, owner])
        try db.execute(sql: """
            INSERT INTO trait (person_id, name, origin_person_id, value, source, updated_at_ms)
              SELECT ?\(n + 1), name, \(origin), value, source, updated_at_ms FROM trait WHERE \(condition) AND true
            ON CONFLICT (person_id, name, origin_person_id) DO UPDATE SET value = excluded.value, source = excluded.source,
              updated_at_ms = excluded.updated_at_ms WHERE excluded.updated_at_ms > trait.updated_at_ms
            """, arguments: all)
        try db.execute(sql: "DELETE FROM trait WHERE \(condition)", arguments: StatementArguments(arguments))
        try db.execute(sql: "UPDATE consent SET person_id = ?\(n + 1), origin_person_id = \(origin) WHERE \(condition)", arguments: all)
    }

    public struct Erased: Sendable, Equatable {
        public var events = 0, traits = 0, consents = 0
        /// The person erased (`erase(person:nowMs:)`: the one given, or the one it had been
        /// merged into).
        public var person = ""
    }

    /// Deletes the person's events, traits and consent records (also those a merge gave
    /// another person) from the event file; their state (an empty one added to `states`)
    /// leaves the state file with the next flush, and the persons who held some of them are
    /// recomputed without them.
    static func erase(_ db: Database, _ person: String, specs: [String: [FeatureSpec]], now: Int64,
                      states: inout [String: ProfileStoreV1.PersonState]) throws -> Erased {
        var erased = Erased()
        // No person has the empty id, and every own trait and consent row has the empty origin.
        guard !person.isEmpty else { return erased }
        // Each table by person, then by origin through its partial index (its condition named
        // in full, so that SQLite uses it).
        let tables = [("event", "origin_person_id <> person_id"), ("trait", "origin_person_id <> ''"), ("consent", "origin_person_id <> ''")]
        let owners = try String.fetchAll(db, sql: tables.map { table, moved in
            "SELECT person_id FROM \(table) WHERE origin_person_id = ?1 AND \(moved) AND person_id <> ?1"
        }.joined(separator: " UNION "), arguments: [person])
        let removed = try tables.map { table, moved in
            try db.execute(sql: "DELETE FROM \(table) WHERE person_id = ?", arguments: [person])
            let own = db.changesCount
            try db.execute(sql: "DELETE FROM \(table) WHERE origin_person_id = ? AND \(moved)", arguments: [person])
            return own + db.changesCount
        }
        (erased.events, erased.traits, erased.consents) = (removed[0], removed[1], removed[2])
        states[person] = ProfileStoreV1.PersonState()
        for owner in owners { states[owner] = try recompute(db, owner, specs: specs, now: now) }
        return erased
    }

    /// Erases every event, trait and consent record and the feature state of `person`, and
    /// checkpoints both files so no copy stays in a WAL (when there was anything to erase). An
    /// id the feed merged away names the
    /// person it was merged into, as in every other call: that person is erased, with what it
    /// absorbed (the id is that person now). An erased id erases nothing more.
    public func erase(person: String, nowMs: Int64) throws -> Erased {
        try settlePendingErasure()
        var goneChanges: [(person: String, target: String?)] = []
        let erased = try rewriting({ db in
            var states: [String: ProfileStoreV1.PersonState] = [:]
            let specs = definitions.withLock { $0.byEventType }
            // On the writer: the feed changes `gone` only here, so this is the file's answer. An
            // id erased already (a retry) names the person its merges led to, as the first
            // answer did, and its tombstone stays as it is.
            let target = current(person) ?? gone.withLock { gone in
                var id = person
                for _ in 0..<64 { guard let next = gone[id], !next.isEmpty else { break }; id = next }
                return id
            }
            var erased = try Self.erase(db, target, specs: specs, now: nowMs, states: &states)
            erased.person = target
            try Self.markGone(db, target, "", &goneChanges)
            return (erased, states)
        }, afterCommit: { noteGone(goneChanges) })
        // Nothing of the person was kept (no event, and so no feature state; no trait or
        // consent): no copy to scrub from a WAL, and two checkpoints saved (a client erasing a
        // list of ids most of which were never seen paid them for each).
        if erased.events + erased.traits + erased.consents > 0 { try settleErasure() }
        return erased
    }

    /// Writes every dirty state, empties `dirty_person` of them, and checkpoints both files:
    /// after an erasure no copy stays in a WAL; at a graceful shutdown the next start has
    /// nothing to recompute.
    public func settle(patience: Duration = .seconds(5)) throws {
        try flush()
        try SQLiteStore.checkpoint(statePool, patience: patience)
        try SQLiteStore.checkpoint(pool, patience: patience)
    }

    /// `settle` after an erasure; if it fails, it stays owed (`truncation`): the service's
    /// `settleRetrier` tries again every second, and the next Erase first (neither the feed
    /// nor a client replays the erasure).
    func settleErasure(patience: Duration = .seconds(5)) throws {
        truncation.owe()
        try settlePendingErasure(patience: patience)
    }

    /// Settles an erasure whose settling failed before, if one did.
    func settlePendingErasure(patience: Duration = .seconds(5)) throws {
        try truncation.pay { try settle(patience: patience) }
    }

    /// Tries every `interval` an erasure's settle that failed, once each, without waiting
    /// for readers. Run it as a service, with or without the identity feed.
    public func settleRetrier(interval: Duration = .seconds(1), logger: Logger) -> OwedTruncation.Retrier {
        OwedTruncation.Retrier(truncation, interval: interval, logger: logger) { [self] in try settle(patience: .zero) }
    }

    // MARK: - Persons merged away or erased

    /// `person` as the identity feed left it: the person it was merged into (through any
    /// chain), itself, or nil when it was erased.
    public func current(_ person: String) -> String? {
        gone.withLock { Self.follow(person, in: $0) }
    }

    static func follow(_ person: String, in gone: [String: String]) -> String? {
        survivor(of: person) { gone[$0] }
    }

    /// Records in `person_gone` that `person` was merged into `target`, erased (`""`), or is
    /// back (nil, after an unmerge); `changes` collects it for memory once committed.
    static func markGone(_ db: Database, _ person: String, _ target: String?, _ changes: inout [(person: String, target: String?)]) throws {
        if let target {
            try db.execute(sql: "INSERT OR REPLACE INTO person_gone (person_id, target) VALUES (?, ?)", arguments: [person, target])
        } else {
            try db.execute(sql: "DELETE FROM person_gone WHERE person_id = ?", arguments: [person])
        }
        changes.append((person, target))
    }

    /// `markGone`'s changes, in memory: call on the event file's writer right after they
    /// committed, so that no Track transaction sees the file and memory disagree.
    private func noteGone(_ changes: [(person: String, target: String?)]) {
        guard !changes.isEmpty else { return }
        gone.withLock { gone in for (person, target) in changes { gone[person] = target } }
    }

    // MARK: - The identity change feed (IdentityChangeSink)

    /// The last identity change applied (0: none); the feed resumes after it.
    public func identityCursor() throws -> Int64 {
        try pool.read { db in try Int64.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'identity_seq'") ?? 0 }
    }

    /// Applies identity changes in order, each with the cursor in the same transaction:
    /// after a crash the feed resumes exactly where the store stopped.
    public func apply(_ changes: [(seq: Int64, change: IdentityChange)], nowMs: Int64) throws {
        guard !changes.isEmpty else { return }
        var goneChanges: [(person: String, target: String?)] = []
        let erasedAny = try rewriting({ db in
            var erasedAny = false
            var states: [String: ProfileStoreV1.PersonState] = [:]
            let specs = definitions.withLock { $0.byEventType }
            let cursor = try Int64.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'identity_seq'") ?? 0
            // Whom `person` is now, this batch's changes so far included (memory has them only
            // once it commits); nil when erased.
            func survivorNow(_ person: String) -> String? {
                survivor(of: person) { key in
                    if let change = goneChanges.last(where: { $0.person == key }) { return change.target }
                    return gone.withLock { $0[key] }
                }
            }
            for (seq, change) in changes where seq > cursor {
                switch change {
                case .merge(let target, let sources):
                    // An erased id stays erased: never given a survivor, nor data again.
                    let live = sources.filter { $0 != target && survivorNow($0) != nil }
                    if survivorNow(target) == nil {
                        // Erased here (Profile/Erase) while identity still knew it: what merges
                        // into it is erased too, rather than kept under an id nobody can read.
                        for source in live {
                            _ = try Self.erase(db, source, specs: specs, now: nowMs, states: &states)
                            try Self.markGone(db, source, "", &goneChanges)
                            erasedAny = true
                        }
                        if !live.isEmpty { logger.warning("profile: \(live.count) persons merged into erased \(target) are erased too") }
                        continue
                    }
                    try Self.merge(db, sources: live, into: target, specs: specs, now: nowMs, states: &states)
                    for source in live { try Self.markGone(db, source, target, &goneChanges) }
                case .unmerge(let survivor, let split):
                    // An id erased here (itself, or the person its merges led to) stays erased:
                    // the unmerge gives it nothing back, and it gets no data again.
                    guard survivorNow(split) != nil else { continue }
                    try Self.split(db, split, from: survivor, specs: specs, now: nowMs, states: &states)
                    try Self.markGone(db, split, nil, &goneChanges)
                case .erase(let person, let absorbed):
                    for p in [person] + absorbed where !p.isEmpty {
                        _ = try Self.erase(db, p, specs: specs, now: nowMs, states: &states)
                        try Self.markGone(db, p, "", &goneChanges)
                    }
                    erasedAny = true
                case .other: break
                }
            }
            try db.execute(sql: "INSERT OR REPLACE INTO meta (key, value) VALUES ('identity_seq', ?)",
                           arguments: [max(cursor, changes.map(\.seq).max()!)])
            return (erasedAny, states)
        }, afterCommit: { noteGone(goneChanges) })
        // Up to 1 s for readers to move on (Track waits for the event file's writer meanwhile);
        // failing that, the retrier tries again (the changes are applied: not a feed failure).
        if erasedAny { try? settleErasure(patience: .seconds(1)) }
    }
}

extension ProfileStore: IdentityChangeSink {}
