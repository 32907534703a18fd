import Contracts
import Foundation
import GRDB
import Logging
import IdentityFeed
import Rules
import Storage
import Synchronization

/// Profiles in SQLite: the events (the source of truth, kept for backfills, merges and
/// splits), one feature-state row per person updated incrementally at ingest, traits
/// with provenance, consent with its full history, and the definitions of features and
/// segments. Writes are serialized by SQLite's single writer; the feature and segment
/// definitions live in memory too, changed only inside a write transaction.
///
/// Database access is synchronous on the calling thread (the service runs its handlers
/// on the concurrent pool, never on an event loop).
///
/// Feature state is written behind: Track folds new events into the person's state in
/// memory (`dirty`) and logs the person in `dirty_person` (an append, cheap), and the
/// states reach `person_state` together, sorted, once `flushThreshold` persons are dirty or
/// before any merge, split, erasure or backfill. The events are the durable truth: after a
/// crash, the persons in `dirty_person` are recomputed from their events at start. Readers
/// look in memory first, then in the file. States written by a flush stay in memory as
/// clean copies (up to `cachePersons`), so a busy person's next event or read does not go
/// to the file; anything else that rewrites states (merges, splits, erasure, backfill)
/// drops the clean copies.
public final class ProfileStore: Sendable {
    let pool: DatabasePool
    /// Keeps the WAL short from its own connection (see BackgroundCheckpointer).
    let checkpointer: BackgroundCheckpointer
    let definitions: Mutex<Definitions>
    /// States newer than `person_state`, by person.
    let dirty = Mutex<[String: ProfileStoreV1.PersonState]>([:])
    /// States equal to `person_state`, by person (at most `cachePersons`).
    let clean = Mutex<[String: ProfileStoreV1.PersonState]>([:])
    /// Dirty persons that trigger a flush. Default 20,000.
    public let flushThreshold: Int
    /// Clean states kept in memory. Default 100,000.
    public let cachePersons: Int
    let logger: Logger

    struct Definitions: Sendable {
        var features: [String: FeatureSpec] = [:]
        var byEventType: [String: [FeatureSpec]] = [:]
        var segments: [(name: String, rule: Rule)] = []

        mutating func set(_ spec: FeatureSpec) {
            features[spec.name] = spec
            byEventType = Dictionary(grouping: features.values.sorted { $0.name < $1.name }, by: \.definition.eventType)
        }
    }

    /// - Parameters:
    ///   - flushThreshold: dirty persons kept in memory before their states are written
    ///     together (bounds memory and the recomputation after a crash).
    ///   - cachePersons: clean states kept in memory after a flush (0: none).
    public init(directory: String, flushThreshold: Int = 20_000, cachePersons: Int = 100_000,
                logger: Logger = Logger(label: "arbiter.profile.store")) throws {
        self.flushThreshold = max(1, flushThreshold)
        self.cachePersons = max(0, cachePersons)
        self.logger = logger
        (pool, checkpointer) = try SQLiteStore.openWithCheckpointer(directory: directory, name: "profile", migrator: Self.migrator)
        var loaded = Definitions()
        try pool.read { db in
            for row in try Row.fetchAll(db, sql: "SELECT definition, version FROM feature") {
                let definition = try ProfileV1.FeatureDefinition(serializedBytes: [UInt8](row["definition"] as Data))
                loaded.set(try FeatureSpec(definition, version: UInt32(row["version"] as Int64)))
            }
            for row in try Row.fetchAll(db, sql: "SELECT name, rule FROM segment ORDER BY name") {
                loaded.segments.append((row["name"], try Rule(row["rule"])))
            }
        }
        definitions = Mutex(loaded)
        try recoverDirty(nowMs: Int64(Date().timeIntervalSince1970 * 1000))
    }

    /// Recomputes from their events the persons whose state had not reached the file when
    /// the process stopped.
    func recoverDirty(nowMs: Int64) throws {
        try pool.write { db in
            let specs = definitions.withLock { $0.byEventType }
            for person in try String.fetchSet(db, sql: "SELECT DISTINCT person_id FROM dirty_person") {
                try Self.recompute(db, person, specs: specs, now: nowMs)
            }
            try db.execute(sql: "DELETE FROM dirty_person")
        }
    }

    /// Runs `body` in a write transaction after writing every dirty state to the file (in
    /// the same transaction); once it has committed, and before any other writer runs, the
    /// written states leave the dirty set and stay as clean copies. The clean copies of the
    /// persons `body` rewrites are dropped first (`rewrites`: nil for every person).
    func flushing<T>(rewrites: Set<String>?, _ body: (Database) throws -> T) throws -> T {
        try pool.writeWithoutTransaction { db in
            var result: T?
            let states = dirty.withLock { $0 }
            // Dropped before `body` changes the file, so no reader sees a copy older than it.
            clean.withLock { clean in
                guard let rewrites else { return clean = [:] }
                for person in rewrites { clean.removeValue(forKey: person) }
            }
            try db.inTransaction {
                if !states.isEmpty {
                    for (person, state) in states.sorted(by: { $0.key < $1.key }) { try Self.saveState(db, person, state) }
                    try db.execute(sql: "DELETE FROM dirty_person")
                }
                result = try body(db)
                return .commit
            }
            clean.withLock { clean in
                guard cachePersons > 0 else { return }
                let kept = rewrites?.isEmpty == true ? states : states.filter { rewrites?.contains($0.key) == false }
                clean.merge(kept) { _, new in new }
                // Over the limit: drop arbitrary copies (a dictionary's order is effectively random).
                let excess = clean.count - cachePersons
                if excess > 0 { for key in Array(clean.keys.prefix(excess)) { clean.removeValue(forKey: key) } }
            }
            dirty.withLock { $0 = [:] }
            return result!
        }
    }

    /// Writes every dirty state to the file now.
    public func flush() throws { try flushing(rewrites: []) { _ in } }

    /// The state of `person` kept in memory (dirty first), if any.
    func cachedState(_ person: String) -> ProfileStoreV1.PersonState? {
        dirty.withLock { $0[person] } ?? clean.withLock { $0[person] }
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
        return try flushing(rewrites: nil) { db in
            let current = definitions.withLock { $0.features[probe.name] }
            var spec = probe
            if let current { spec = current.definition == definition ? current : try FeatureSpec(definition, version: current.version + 1) }
            if spec.version != current?.version {
                try db.execute(sql: "INSERT OR REPLACE INTO feature (name, version, definition, defined_at_ms) VALUES (?, ?, ?, ?)",
                               arguments: [spec.name, Int64(spec.version), Data(definition.serializedBytes()), nowMs])
            }
            if backfill { try Self.backfill(db, spec, nowMs: nowMs) }
            let defined = spec
            definitions.withLock { $0.set(defined) }
            return spec
        }
    }

    /// Defines a segment; `rule` was parsed against the features defined now.
    public func defineSegment(name: String, rule: Rule, nowMs: Int64) throws {
        try pool.write { db in
            try db.execute(sql: "INSERT OR REPLACE INTO segment (name, rule, defined_at_ms) VALUES (?, ?, ?)",
                           arguments: [name, rule.source, nowMs])
            definitions.withLock { definitions in
                definitions.segments.removeAll { $0.name == name }
                definitions.segments.append((name, rule))
                definitions.segments.sort { $0.name < $1.name }
            }
        }
    }

    static func backfill(_ db: Database, _ spec: FeatureSpec, nowMs: Int64) throws {
        var person: String?
        var events: [TrackedEvent] = []
        func flush() throws {
            guard let person else { return }
            var state = try loadState(db, person)
            var feature = ProfileStoreV1.FeatureState()
            feature.name = spec.name
            feature.version = spec.version
            for event in events where spec.matches(event) { spec.apply(event, to: &feature, now: nowMs) }
            state.features.removeAll { $0.name == spec.name }
            state.features.append(feature)
            try saveState(db, person, state)
        }
        let cursor = try Row.fetchCursor(db, sql: "SELECT person_id, body FROM event WHERE type = ? ORDER BY person_id",
                                         arguments: [spec.definition.eventType])
        while let row = try cursor.next() {
            let owner: String = row["person_id"]
            if owner != person {
                try flush()
                person = owner
                events = []
            }
            events.append(try decodeEvent(row["body"], person: owner))
        }
        try flush()
    }

    // MARK: - Events

    public struct TrackResult: Sendable, Equatable {
        /// For each event given: true when stored, false when its id was seen before.
        public var stored: [Bool]
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
        let ingest = Ingest(events: events, bodies: events.map { Data(Self.encodeEvent($0)) }, nowMs: nowMs)
        return try await self.ingest.submit(ingest) { [self] batch in try write(batch) }
    }

    private func write(_ batch: [Ingest]) throws -> [TrackResult] {
        let (results, dirtyCount) = try pool.writeWithoutTransaction { db -> ([TrackResult], Int) in
            let byType = definitions.withLock { $0.byEventType }
            var results: [TrackResult] = []
            var updated: [String: ProfileStoreV1.PersonState] = [:]
            var newlyDirty: [String] = []
            try db.inTransaction {
                let insert = try db.cachedStatement(sql: """
                    INSERT OR IGNORE INTO event (event_id, person_id, origin_person_id, type, occurred_at_ms, body) VALUES (?, ?, ?, ?, ?, ?)
                    """)
                for entry in batch {
                    var stored: [Bool] = []
                    stored.reserveCapacity(entry.events.count)
                    var perPerson: [String: [TrackedEvent]] = [:]
                    for (event, body) in zip(entry.events, entry.bodies) {
                        try insert.execute(arguments: [event.eventID, event.personID, event.personID, event.type, event.occurredAtMs, body])
                        let isNew = db.changesCount > 0
                        stored.append(isNew)
                        if isNew { perPerson[event.personID, default: []].append(event) }
                    }
                    for (person, personEvents) in perPerson {
                        var state: ProfileStoreV1.PersonState
                        if let current = updated[person] {
                            state = current
                        } else if let current = dirty.withLock({ $0[person] }) {
                            state = current  // logged in dirty_person already
                        } else {
                            state = try clean.withLock { $0[person] } ?? Self.loadState(db, person)
                            newlyDirty.append(person)
                        }
                        Self.fold(personEvents, into: &state, specs: byType, now: entry.nowMs)
                        updated[person] = state
                    }
                    results.append(TrackResult(stored: stored))
                }
                let log = try db.cachedStatement(sql: "INSERT INTO dirty_person (person_id) VALUES (?)")
                for person in newlyDirty { try log.execute(arguments: [person]) }
                return .commit
            }
            // Committed; no other writer runs before this.
            let count = dirty.withLock { dirty in
                dirty.merge(updated) { _, new in new }
                return dirty.count
            }
            return (results, count)
        }
        if dirtyCount >= flushThreshold {
            // The events are committed and the dirty persons logged: a failed flush loses
            // nothing and is tried again by the next write, so these calls still succeed.
            do { try flush() } catch { logger.error("profile: writing \(dirtyCount) feature states failed (retried with the next Track): \(error)") }
        }
        return results
    }

    /// Adds events to a person's state: seen times, count, and every matching feature.
    static func fold(_ events: [TrackedEvent], into state: inout ProfileStoreV1.PersonState,
                     specs: [String: [FeatureSpec]], now: Int64) {
        for event in events {
            state.events += 1
            state.firstSeenMs = state.firstSeenMs == 0 ? event.occurredAtMs : min(state.firstSeenMs, event.occurredAtMs)
            state.lastSeenMs = max(state.lastSeenMs, event.occurredAtMs)
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

    /// Rebuilds a person's whole state from the events stored for them (after a merge or split).
    static func recompute(_ db: Database, _ person: String, specs: [String: [FeatureSpec]], now: Int64) throws {
        let events = try Row.fetchAll(db, sql: "SELECT body FROM event WHERE person_id = ? ORDER BY occurred_at_ms", arguments: [person])
            .map { try decodeEvent($0["body"], person: person) }
        guard !events.isEmpty else {
            try db.execute(sql: "DELETE FROM person_state WHERE person_id = ?", arguments: [person])
            return
        }
        var state = ProfileStoreV1.PersonState()
        fold(events, into: &state, specs: specs, now: now)
        try saveState(db, person, state)
    }

    static func loadState(_ db: Database, _ person: String) throws -> ProfileStoreV1.PersonState {
        guard let data = try Data.fetchOne(db.cachedStatement(sql: "SELECT state FROM person_state WHERE person_id = ?"),
                                           arguments: [person]) else { return ProfileStoreV1.PersonState() }
        return try ProfileStoreV1.PersonState(serializedBytes: data)
    }

    static func saveState(_ db: Database, _ person: String, _ state: ProfileStoreV1.PersonState) throws {
        try db.cachedStatement(sql: "INSERT OR REPLACE INTO person_state (person_id, state) VALUES (?, ?)")
            .execute(arguments: [person, Data(state.serializedBytes())])
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

    static func decodeEvent(_ body: Data, person: String) throws -> TrackedEvent {
        let wire = try ProfileV1.Event(serializedBytes: body)
        var properties: [String: RuleValue] = [:]
        for field in wire.properties { properties[field.name] = RuleValue(field.value) }
        return TrackedEvent(eventID: wire.eventId, personID: person, type: wire.type, occurredAtMs: wire.occurredAtMs,
                            value: wire.value, properties: properties)
    }

    // MARK: - Traits and consent

    public struct StoredTrait: Sendable, Hashable {
        public var name: String
        public var value: RuleValue
        public var source: String
        public var updatedAtMs: Int64
    }

    /// Sets traits; a trait whose stored value is newer than `updatedAtMs` keeps it.
    /// Returns the names of the traits left alone (stale).
    public func setTraits(person: String, _ traits: [(name: String, value: RuleValue)], source: String,
                          updatedAtMs: Int64) throws -> [String] {
        try pool.write { db in
            var stale: [String] = []
            for (name, value) in traits {
                try db.execute(sql: """
                    INSERT INTO trait (person_id, name, value, source, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                    ON CONFLICT (person_id, name) DO UPDATE SET value = ?3, source = ?4, updated_at_ms = ?5
                    WHERE excluded.updated_at_ms >= trait.updated_at_ms
                    """, arguments: [person, name, Data(CommonV1.Value(value).serializedBytes()), source, updatedAtMs])
                if db.changesCount == 0 { stale.append(name) }
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

    /// Appends consent records to the person's history.
    public func setConsent(person: String, _ records: [Consent]) throws {
        try pool.write { db in
            for r in records {
                try db.execute(sql: "INSERT INTO consent (person_id, purpose, channel, granted, source, at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                               arguments: [person, r.purpose, r.channel, r.granted, r.source, r.atMs])
            }
        }
    }

    /// The newest record per purpose and channel, and (optionally) the whole history, oldest first.
    public func consent(person: String, history: Bool) throws -> (current: [Consent], history: [Consent]) {
        try pool.read { db in try Self.consent(db, person: person, history: history) }
    }

    static func consent(_ db: Database, person: String, history: Bool) throws -> (current: [Consent], history: [Consent]) {
        let all = try Row.fetchAll(db.cachedStatement(sql: """
            SELECT purpose, channel, granted, source, at_ms FROM consent WHERE person_id = ? ORDER BY purpose, channel, at_ms, id
            """), arguments: [person]).map {
            Consent(purpose: $0["purpose"], channel: $0["channel"], granted: $0["granted"], source: $0["source"], atMs: $0["at_ms"])
        }
        var current: [Consent] = []
        for record in all {
            if let last = current.last, last.purpose == record.purpose, last.channel == record.channel {
                current[current.count - 1] = record
            } else {
                current.append(record)
            }
        }
        return (current, history ? all.sorted { ($0.atMs, $0.purpose, $0.channel) < ($1.atMs, $1.purpose, $1.channel) } : [])
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

    /// The person's profile as of `nowMs` (features decayed and windowed now), or nil when
    /// nothing is known about them.
    public func profile(person: String, nowMs: Int64) throws -> Profile? {
        let (specs, segments) = definitions.withLock { ($0.features, $0.segments) }
        // Memory before the file: a state leaves memory only once the file has it.
        let cached = cachedState(person)
        return try pool.read { db in
            let stateData = cached != nil ? nil
                : try Data.fetchOne(db.cachedStatement(sql: "SELECT state FROM person_state WHERE person_id = ?"), arguments: [person])
            let traits = try Row.fetchAll(db.cachedStatement(sql: """
                SELECT name, value, source, updated_at_ms FROM trait WHERE person_id = ? ORDER BY name
                """), arguments: [person]).map { row in
                StoredTrait(name: row["name"], value: RuleValue(try CommonV1.Value(serializedBytes: row["value"] as Data)) ?? .string(""),
                            source: row["source"], updatedAtMs: row["updated_at_ms"])
            }
            let consent = try Self.consent(db, person: person, history: false).current
            guard cached != nil || stateData != nil || !traits.isEmpty || !consent.isEmpty else { return nil }
            let state = try cached ?? stateData.map { try ProfileStoreV1.PersonState(serializedBytes: $0) } ?? ProfileStoreV1.PersonState()
            let stateByName = Dictionary(state.features.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
            var features: [(name: String, value: Double)] = []
            var featureValues: [String: Double] = [:]
            for spec in specs.values.sorted(by: { $0.name < $1.name }) {
                if let value = spec.value(stateByName[spec.name], now: nowMs) {
                    features.append((spec.name, value))
                    featureValues[spec.name] = value
                }
            }
            let traitValues = Dictionary(traits.map { ($0.name, $0.value) }, uniquingKeysWith: { a, _ in a })
            let lookup = Self.lookup(traits: traitValues, features: featureValues, consent: consent)
            let members = segments.filter { $0.rule.evaluate(lookup) }.map(\.name)
            return Profile(personID: person, traits: traits, features: features, segments: members, consent: consent,
                           firstSeenMs: state.firstSeenMs, lastSeenMs: state.lastSeenMs)
        }
    }

    /// How rules read a profile: `trait.<name>`, `feature.<name>`, and `consent.<purpose>`
    /// or `consent.<purpose>.<channel>` (true when the newest record grants).
    static func lookup(traits: [String: RuleValue], features: [String: Double], consent: [Consent])
        -> (String, String) -> RuleValue? {
        { namespace, name in
            switch namespace {
            case "trait": return traits[name]
            case "feature": return features[name].map(RuleValue.number)
            case "consent":
                return consent.last { record in
                    let channel = CommonV1.Channel(rawValue: record.channel).ruleName
                    return name == record.purpose && record.channel == 0 || name == "\(record.purpose).\(channel)"
                }.map { .bool($0.granted) }
            default: return nil
            }
        }
    }

    // MARK: - Merges, splits and erasure

    /// Applies a merge from the identity change feed: `sources`' events, traits (the newest
    /// per name wins) and consent move to `target`, whose features are recomputed from all
    /// the events, as if one person had them from the start.
    static func merge(_ db: Database, sources: [String], into target: String, specs: [String: [FeatureSpec]], now: Int64) throws {
        for source in sources where source != target {
            try db.execute(sql: "UPDATE event SET person_id = ? WHERE person_id = ?", arguments: [target, source])
            try db.execute(sql: """
                INSERT INTO trait (person_id, name, value, source, updated_at_ms)
                SELECT ?1, name, value, source, updated_at_ms FROM trait WHERE person_id = ?2 AND true
                ON CONFLICT (person_id, name) DO UPDATE SET value = excluded.value, source = excluded.source,
                  updated_at_ms = excluded.updated_at_ms WHERE excluded.updated_at_ms > trait.updated_at_ms
                """, arguments: [target, source])
            try db.execute(sql: "DELETE FROM trait WHERE person_id = ?", arguments: [source])
            try db.execute(sql: "UPDATE consent SET person_id = ? WHERE person_id = ?", arguments: [target, source])
            try db.execute(sql: "DELETE FROM person_state WHERE person_id = ?", arguments: [source])
        }
        try recompute(db, target, specs: specs, now: now)
    }

    /// Applies an unmerge: the events first tracked for `split` go back to it, and both
    /// persons' features are recomputed. Traits and consent carry no origin and stay.
    static func split(_ db: Database, _ split: String, from survivor: String, specs: [String: [FeatureSpec]], now: Int64) throws {
        try db.execute(sql: "UPDATE event SET person_id = ? WHERE person_id = ? AND origin_person_id = ?",
                       arguments: [split, survivor, split])
        try recompute(db, survivor, specs: specs, now: now)
        try recompute(db, split, specs: specs, now: now)
    }

    public struct Erased: Sendable, Equatable {
        public var events = 0, traits = 0, consents = 0
    }

    static func erase(_ db: Database, _ person: String) throws -> Erased {
        var erased = Erased()
        try db.execute(sql: "DELETE FROM event WHERE person_id = ?1 OR origin_person_id = ?1", arguments: [person])
        erased.events = db.changesCount
        try db.execute(sql: "DELETE FROM trait WHERE person_id = ?", arguments: [person])
        erased.traits = db.changesCount
        try db.execute(sql: "DELETE FROM consent WHERE person_id = ?", arguments: [person])
        erased.consents = db.changesCount
        try db.execute(sql: "DELETE FROM person_state WHERE person_id = ?", arguments: [person])
        try db.execute(sql: "DELETE FROM dirty_person WHERE person_id = ?", arguments: [person])
        return erased
    }

    /// Erases every event, trait and consent record of `person`, and checkpoints so no
    /// copy stays in the WAL.
    public func erase(person: String) throws -> Erased {
        let erased = try flushing(rewrites: [person]) { db in try Self.erase(db, person) }
        try SQLiteStore.checkpoint(pool)
        return erased
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
        var erasedAny = false
        var rewrites = Set<String>()
        for (_, change) in changes {
            switch change {
            case .merge(let target, let sources): rewrites.formUnion([target] + sources)
            case .unmerge(let survivor, let split): rewrites.formUnion([survivor, split])
            case .erase(let person, let absorbed): rewrites.formUnion([person] + absorbed)
            case .other: break
            }
        }
        try flushing(rewrites: rewrites) { db in
            let specs = definitions.withLock { $0.byEventType }
            let cursor = try Int64.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'identity_seq'") ?? 0
            for (seq, change) in changes where seq > cursor {
                switch change {
                case .merge(let target, let sources): try Self.merge(db, sources: sources, into: target, specs: specs, now: nowMs)
                case .unmerge(let survivor, let split): try Self.split(db, split, from: survivor, specs: specs, now: nowMs)
                case .erase(let person, let absorbed):
                    for p in [person] + absorbed { _ = try Self.erase(db, p) }
                    erasedAny = true
                case .other: break
                }
            }
            try db.execute(sql: "INSERT OR REPLACE INTO meta (key, value) VALUES ('identity_seq', ?)",
                           arguments: [max(cursor, changes.map(\.seq).max()!)])
        }
        if erasedAny { try SQLiteStore.checkpoint(pool) }
    }
}

extension ProfileStore: IdentityChangeSink {}
