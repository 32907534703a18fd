import Contracts
import Foundation
import GRDB
import IdentityFeed
import Logging
import RPC
import Storage
import Synchronization

/// The decision service's SQLite store: the versioned action catalog, the contact policy,
/// every decision (with all its candidates, for replay and evaluation), the offers each
/// person received (for caps), outcomes (idempotent by outcome id) and the learner's
/// evidence per action and context. The catalog, policy and evidence are mirrored in
/// memory and changed only inside write transactions.
///
/// Database access is synchronous on the calling thread: keep it off event loops (Decide
/// and ReportOutcome, which run on one, ask `historyInMemory` and `recentlyOffered` first
/// and read the file on the concurrent pool).
public final class DecisionStore: Sendable {
    let pool: DatabasePool
    /// Keeps the WAL short from its own connection (see BackgroundCheckpointer).
    let checkpointer: BackgroundCheckpointer
    /// The WAL truncation an erasure from the identity feed owes (see `truncationRetrier`).
    let truncation = OwedTruncation()
    let configuration: LearnerConfiguration
    let memory: Mutex<Memory>
    /// The decision log's group commit: one transaction for every decision and outcome
    /// waiting (an outcome in a transaction of its own cost more CPU than a decision,
    /// profiled at 3,000 decisions/s).
    let log: GroupCommit<LogEntry, Bool>
    /// Decision ids are `TimeOrderedID`s with this prefix, so a time range is a key range.
    static let decisionIDPrefix = "d"
    /// What caps and suppressions read: the offers of decisions not yet committed, and the
    /// recent offers and outcomes (see `Contacts`).
    let contacts: Mutex<Contacts>

    /// The offers of decisions not yet committed, by person (caps see them at once), and the
    /// recent offers and outcomes in memory. One lock, so that a decision moves from one to
    /// the other at once: `inMemory` marks the pending offers already in `recent`.
    struct Contacts: Sendable {
        var pending: [String: [PendingOffer]] = [:]
        var recent: RecentHistory
        /// The latest decisions that offered (or held out) something, by id, for ReportOutcome.
        var decisions = FIFOCache<String, Offered>(capacity: DecisionStore.recentDecisions)
        /// Persons the identity feed recently merged into another: a decision or outcome in
        /// flight for one when the merge came is logged for the survivor. (A Decide that
        /// starts later asks the profile service, which answers for the survivor; when it
        /// cannot, `person_merged` in the file says: `survivorInFile`.)
        var gone = FIFOCache<String, String>(capacity: 10_000)
        /// Every person the identity feed erased (`person_erased`; erasures are rare): a
        /// decision or outcome in flight for one is logged for no one, and a later Decide for
        /// one is refused (the profile's NOT_FOUND would read as a person not seen yet).
        var erased: Set<String> = []

        /// `person` after the recent merges and every erasure: the survivor, itself, or nil
        /// (erased).
        func current(_ person: String) -> String? {
            survivor(of: person) { erased.contains($0) ? "" : gone[$0] }
        }

        /// Whose reservations hold `record`'s offers: its person's, the survivor's after a
        /// merge while it was being logged, or no one's after an erasure (or when it reserved
        /// nothing). `pending` holds only decisions in flight, so the search is short.
        func holder(of record: DecisionV1.DecisionRecord) -> String? {
            let id = record.decisionId
            if pending[record.personId]?.contains(where: { $0.decision == id }) == true { return record.personId }
            return pending.first { $0.value.contains { $0.decision == id } }?.key
        }
    }

    /// How many of the latest decisions ReportOutcome finds in memory (a person id and the
    /// offered actions' arm keys each); an outcome on an older one reads and decodes its
    /// record (~4.6 KB) from the file.
    static let recentDecisions = 100_000

    /// What an outcome needs of the decision it names: for whom it was made and, per offered
    /// action, the arms an outcome on it teaches. An action the decision held out (its
    /// holdout) takes outcomes too and teaches nothing: a held-out person who converts anyway
    /// is the control LiftReport compares with.
    struct Offered: Sendable {
        var personId: String
        var decidedAtMs: Int64
        var arms: [String: [ArmKey]]

        init(_ record: DecisionV1.DecisionRecord) {
            personId = record.personId
            decidedAtMs = record.decidedAtMs
            arms = Dictionary(record.actions.map { ($0.actionId, ArmKey.learned($0.actionId, in: record)) }) { first, _ in first }
            for held in record.heldOutActions where arms[held] == nil { arms[held] = [] }
        }

        /// Whether an outcome may name a decision: it offered or held out an action.
        static func takesOutcomes(_ record: DecisionV1.DecisionRecord) -> Bool {
            !record.actions.isEmpty || !record.heldOutActions.isEmpty
        }
    }

    /// What the log's group commit writes.
    enum LogEntry: Sendable {
        /// A decision (and its encoding: encoded by the caller, so that the single writer
        /// does not), with the arms its chosen actions count a failure on until a positive outcome.
        case decision(DecisionV1.DecisionRecord, encoded: Data, arms: [ArmKey])
        /// An outcome reported on a logged decision.
        case outcome(DecisionV1.ReportOutcomeRequest, offered: Offered, atMs: Int64)
    }

    struct Memory: Sendable {
        var actions: [String: ActionSpec] = [:] {
            didSet { sortedActions = actions.values.sorted { $0.id < $1.id } }
        }
        /// `actions` by id, kept sorted for Decide (which reads it on every call).
        private(set) var sortedActions: [ActionSpec] = []
        var catalogVersion: UInt64 = 0
        var policy = DecisionV1.ContactPolicy()
        var arms: [ArmKey: Arm] = [:]
        /// The placements learned on separately (`LearnerConfiguration.maxPlacements`): those
        /// of the stored arms, and those admitted since.
        var learnedPlacements: Set<String> = []
        var overrides: [String: DecisionV1.Override] = [:] {
            didSet { openOverrides = overrides.values.filter { $0.endedAtMs == 0 }.sorted(by: DecisionStore.byCreation) }
        }
        /// The overrides neither ended nor expired (as of the last read), by creation.
        private(set) var openOverrides: [DecisionV1.Override] = []

        /// Leaves out of `openOverrides` those expired by `nowMs` (nothing ends them: an
        /// expiry is a time, so without this every Decide would scan them forever).
        mutating func dropExpired(nowMs: Int64) {
            if openOverrides.contains(where: { !DecisionStore.isActive($0, nowMs) }) {
                openOverrides.removeAll { !DecisionStore.isActive($0, nowMs) }
            }
        }
    }

    /// The store as the service runs it: `service`'s learner, recent history and commit interval.
    public convenience init(directory: String, for service: DecisionConfiguration) throws {
        try self.init(directory: directory, configuration: service.learner, recentEntries: service.recentHistoryEntries,
                      commitInterval: .milliseconds(service.logCommitIntervalMs))
    }

    /// - Parameters:
    ///   - recentEntries: how many recent offers and outcomes to keep in memory
    ///     (`DecisionConfiguration.recentHistoryEntries`); 0 reads every history from the file.
    ///   - commitInterval: the log's `GroupCommit.commitInterval`
    ///     (`DecisionConfiguration.logCommitIntervalMs`); zero writes at once.
    public init(directory: String, configuration: LearnerConfiguration = .init(),
                recentEntries: Int = DecisionConfiguration().recentHistoryEntries,
                commitInterval: DispatchTimeInterval = .nanoseconds(0)) throws {
        log = GroupCommit(label: "arbiter.decision.log", commitInterval: commitInterval)
        // Every decision is a write: the log is written without pause under load.
        (pool, checkpointer) = try SQLiteStore.openWithCheckpointer(directory: directory, name: "decision", migrator: Self.migrator,
                                                                    checkpoints: .continuous)
        self.configuration = configuration
        var loaded = Memory()
        var recent = RecentHistory(limit: recentEntries)
        var erased: Set<String> = []
        try pool.read { db in
            var actions: [String: ActionSpec] = [:]
            for row in try Row.fetchAll(db, sql: "SELECT body FROM action") {
                let action = try DecisionV1.Action(serializedBytes: row["body"] as Data)
                actions[action.id] = try ActionSpec(action)
            }
            loaded.actions = actions  // one sort, not one per action
            loaded.catalogVersion = try UInt64(Int64.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'catalog_version'") ?? 0)
            if let policy = try Data.fetchOne(db, sql: "SELECT body FROM policy WHERE id = 1") {
                loaded.policy = try DecisionV1.ContactPolicy(serializedBytes: policy)
            }
            loaded.arms = try Self.loadArms(db)
            loaded.learnedPlacements = Set(loaded.arms.keys.compactMap(\.placement))
            loaded.overrides = try Self.loadOverrides(db)
            recent = try RecentHistory.load(db, limit: recentEntries)
            erased = Set(try String.fetchAll(db, sql: "SELECT person_id FROM person_erased"))
        }
        memory = Mutex(loaded)
        var contacts = Contacts(recent: recent)
        contacts.erased = erased
        self.contacts = Mutex(contacts)
    }

    /// Tries every `interval` an erasure's WAL truncation that failed (or that a crash cut
    /// off: a new store owes one), once each, without waiting for readers. Run it as a service.
    public func truncationRetrier(interval: Duration = .seconds(1), logger: Logger) -> OwedTruncation.Retrier {
        truncation.retrier(pool, interval: interval, logger: logger)
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.execute(sql: """
                CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
                CREATE TABLE action (id TEXT PRIMARY KEY, version INTEGER NOT NULL, body BLOB NOT NULL) WITHOUT ROWID;  -- arbiter.decision.v1.Action
                CREATE TABLE action_history (
                  id TEXT NOT NULL, version INTEGER NOT NULL, body BLOB NOT NULL, changed_at_ms INTEGER NOT NULL,
                  PRIMARY KEY (id, version)
                ) WITHOUT ROWID;
                CREATE TABLE policy (id INTEGER PRIMARY KEY CHECK (id = 1), body BLOB NOT NULL);  -- arbiter.decision.v1.ContactPolicy
                CREATE TABLE decision (
                  decision_id TEXT PRIMARY KEY,           -- time-ordered, so inserts append
                  person_id TEXT NOT NULL,                -- empty when the person was unknown
                  decided_at_ms INTEGER NOT NULL,
                  record BLOB NOT NULL                    -- arbiter.decision.v1.DecisionRecord
                ) WITHOUT ROWID;
                CREATE INDEX decision_by_person ON decision(person_id) WHERE person_id != '';
                CREATE TABLE offer (                      -- what each person was offered: contact caps
                  person_id TEXT NOT NULL,
                  at_ms INTEGER NOT NULL,
                  action_id TEXT NOT NULL,
                  channel INTEGER NOT NULL,
                  decision_id TEXT NOT NULL,
                  PRIMARY KEY (person_id, at_ms, decision_id, action_id)
                ) WITHOUT ROWID;
                CREATE TABLE outcome (
                  outcome_id TEXT PRIMARY KEY,            -- the idempotency key
                  decision_id TEXT NOT NULL,
                  person_id TEXT NOT NULL,
                  action_id TEXT NOT NULL,
                  kind INTEGER NOT NULL,                  -- arbiter.decision.v1.Outcome
                  value REAL NOT NULL,
                  occurred_at_ms INTEGER NOT NULL
                ) WITHOUT ROWID;
                CREATE INDEX outcome_by_person ON outcome(person_id, occurred_at_ms);
                CREATE INDEX outcome_by_decision ON outcome(decision_id, action_id);
                CREATE TABLE arm (
                  action_id TEXT NOT NULL,
                  context TEXT NOT NULL,                  -- "*" or "placement:<name>"
                  successes REAL NOT NULL,
                  failures REAL NOT NULL,
                  updated_ms INTEGER NOT NULL,
                  PRIMARY KEY (action_id, context)
                ) WITHOUT ROWID;
                """)
        }
        migrator.registerMigration("v2: overrides") { db in
            try db.execute(sql: """
                CREATE TABLE override (id TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID;  -- arbiter.decision.v1.Override
                CREATE TABLE override_change (            -- the audit trail
                  override_id TEXT NOT NULL,
                  version INTEGER NOT NULL,
                  at_ms INTEGER NOT NULL,
                  body BLOB NOT NULL,                     -- arbiter.decision.v1.OverrideChange
                  PRIMARY KEY (override_id, version)
                ) WITHOUT ROWID;
                """)
        }
        migrator.registerMigration("v3: decisions found by person through offer") { db in
            // The person index on `decision` cost a random page write per decision. `offer`
            // already has a row per offered action by person: a decision that offered nothing
            // gets one with action_id '', and merges and erasures find decisions through it.
            try db.execute(sql: """
                INSERT OR IGNORE INTO offer (person_id, at_ms, action_id, channel, decision_id)
                  SELECT person_id, decided_at_ms, '', 0, decision_id FROM decision d
                  WHERE person_id != '' AND NOT EXISTS
                    (SELECT 1 FROM offer o WHERE o.person_id = d.person_id AND o.at_ms = d.decided_at_ms AND o.decision_id = d.decision_id);
                DROP INDEX decision_by_person;
                """)
        }
        migrator.registerMigration("v4: decision records in a rowid table") { db in
            // In a WITHOUT ROWID table a row's payload past ~1,000 bytes (of a 4 KiB page) spills
            // to overflow pages of its own: every record of 1–4 KB took a page and more. In a
            // rowid table one of up to ~4,000 bytes stays in the leaf, and longer ones fill
            // their overflow pages.
            try db.execute(sql: """
                CREATE TABLE decision_v4 (
                  decision_id TEXT PRIMARY KEY,           -- time-ordered, so inserts append to its index
                  person_id TEXT NOT NULL,                -- empty when the person was unknown
                  decided_at_ms INTEGER NOT NULL,
                  record BLOB NOT NULL                    -- DecisionStore.stored(record)
                );
                INSERT INTO decision_v4 (decision_id, person_id, decided_at_ms, record)
                  SELECT decision_id, person_id, decided_at_ms, record FROM decision ORDER BY decision_id;
                DROP TABLE decision;
                ALTER TABLE decision_v4 RENAME TO decision;
                """)
        }
        migrator.registerMigration("v5: persons erased") { db in
            try db.execute(sql: "CREATE TABLE person_erased (person_id TEXT PRIMARY KEY) WITHOUT ROWID")
        }
        migrator.registerMigration("v6: persons merged away") { db in
            // Merges applied before this version are not known here (they were kept in memory).
            try db.execute(sql: "CREATE TABLE person_merged (person_id TEXT PRIMARY KEY, target TEXT NOT NULL) WITHOUT ROWID")
        }
        migrator.registerMigration("v7: whom a merged decision was made for") { db in
            // A merge keeps, on each offer row it moves (a decision's rows move together), the
            // person the decision was made for, so that an unmerge gives it back and an erasure
            // of that person finds it under the survivor. Merges applied before this version
            // are not known here: their decisions stay with the survivor.
            try db.execute(sql: """
                ALTER TABLE offer ADD COLUMN origin_person_id TEXT;  -- NULL: made for person_id
                CREATE INDEX offer_by_origin ON offer(origin_person_id) WHERE origin_person_id IS NOT NULL;
                """)
        }
        migrator.registerMigration("v8: persons merged, by target") { db in
            // An unmerge finds the persons the split person had absorbed without a scan.
            try db.execute(sql: "CREATE INDEX person_merged_by_target ON person_merged(target)")
        }
        migrator.registerMigration("v9: decision request ids") { db in
            // Decide's idempotency key, in a table of its own: created empty (an index on
            // `decision` would read the whole log at the upgrade), written only for Decides
            // with one. A decision deleted (pruned, voided, erased) takes its request id along.
            try db.execute(sql: """
                CREATE TABLE decision_request (
                  request_id TEXT PRIMARY KEY,            -- DecideRequest.request_id
                  decision_id TEXT NOT NULL
                ) WITHOUT ROWID;
                CREATE INDEX decision_request_by_decision ON decision_request(decision_id);
                CREATE TRIGGER decision_request_forget AFTER DELETE ON decision BEGIN
                  DELETE FROM decision_request WHERE decision_id = OLD.decision_id;
                END;
                """)
        }
        return migrator
    }

    // MARK: - Catalog

    /// Adds or changes an action. The same action again changes nothing; a change takes the
    /// next catalog version and keeps the previous form in the history.
    /// The most actions the catalog offers at once (retired ones do not count): every Decide
    /// weighs each, and explains each in its log record.
    public static let maxActiveActions = 1000
    /// The most the active actions may take encoded together (2 MiB).
    public static let maxActiveCatalogBytes = 2 << 20

    public func upsert(_ spec: ActionSpec, nowMs: Int64) throws -> DecisionV1.Action {
        try pool.writeThenUpdate { db in
            let (current, version, others) = memory.withLock { m in
                (m.actions[spec.id], m.catalogVersion, m.actions.values.filter { !$0.action.retired && $0.id != spec.id })
            }
            let adding = current == nil || current!.action.retired
            if adding, others.count >= Self.maxActiveActions {
                throw RPCError(.failedPrecondition, "action: the catalog holds \(others.count) active actions, the most it may; retire one first")
            }
            // An explained decision, and every decision's record, carries each active action's
            // rule and placements: they must fit in a message. (A change that does not grow
            // an action is always allowed.)
            let size = spec.encodedSize
            if size > (adding ? 0 : current!.encodedSize) {
                let total = others.reduce(size) { $0 + $1.encodedSize }
                if total > Self.maxActiveCatalogBytes {
                    throw RPCError(.failedPrecondition,
                                   "action: the active catalog would take \(total) bytes encoded, at most \(Self.maxActiveCatalogBytes); retire actions or shorten their rules first")
                }
            }
            var action = spec.action
            action.retired = false
            if let current {
                var comparable = current.action
                comparable.version = 0
                comparable.updatedAtMs = 0
                action.version = 0
                action.updatedAtMs = 0
                if comparable == action { return (current.action, {}) }
            }
            action.version = version + 1
            action.updatedAtMs = nowMs
            try save(db, action, nowMs: nowMs)
            return (action, try remember(action))
        }
    }

    /// Puts a saved action in the memory's catalog (run once its save has committed).
    private func remember(_ action: DecisionV1.Action) throws -> () -> Void {
        let saved = try ActionSpec(action)
        return { [self] in
            memory.withLock {
                $0.actions[action.id] = saved
                $0.catalogVersion = action.version
            }
        }
    }

    /// Retires an action (kept in the catalog and history, never offered again until upserted).
    public func retire(_ id: String, nowMs: Int64) throws -> DecisionV1.Action {
        try pool.writeThenUpdate { db in
            guard let (current, version) = memory.withLock({ m in m.actions[id].map { ($0, m.catalogVersion) } }) else {
                throw RPCError(.notFound, "id: no action \"\(id)\"")
            }
            if current.action.retired { return (current.action, {}) }
            var action = current.action
            action.retired = true
            action.version = version + 1
            action.updatedAtMs = nowMs
            try save(db, action, nowMs: nowMs)
            return (action, try remember(action))
        }
    }

    private func save(_ db: Database, _ action: DecisionV1.Action, nowMs: Int64) throws {
        let body = Data(action.serializedBytes())
        try db.execute(sql: "INSERT OR REPLACE INTO action (id, version, body) VALUES (?, ?, ?)",
                       arguments: [action.id, Int64(action.version), body])
        try db.execute(sql: "INSERT INTO action_history (id, version, body, changed_at_ms) VALUES (?, ?, ?, ?)",
                       arguments: [action.id, Int64(action.version), body, nowMs])
        try db.execute(sql: "INSERT OR REPLACE INTO meta (key, value) VALUES ('catalog_version', ?)", arguments: [Int64(action.version)])
    }

    /// The catalog (sorted by id) and its version.
    public func catalog() -> (actions: [ActionSpec], version: UInt64) {
        memory.withLock { ($0.sortedActions, $0.catalogVersion) }
    }

    public var policy: DecisionV1.ContactPolicy { memory.withLock { $0.policy } }

    /// Replaces the contact policy (validated by the caller); a change takes the next version.
    public func setPolicy(_ caps: [DecisionV1.Cap]) throws -> DecisionV1.ContactPolicy {
        try pool.writeThenUpdate { db in
            var policy = memory.withLock { $0.policy }
            guard policy.caps != caps else { return (policy, {}) }
            policy.caps = caps
            policy.version += 1
            try db.execute(sql: "INSERT OR REPLACE INTO policy (id, body) VALUES (1, ?)", arguments: [Data(policy.serializedBytes())])
            let saved = policy
            return (policy, { [self] in self.memory.withLock { $0.policy = saved } })
        }
    }

    // MARK: - Learning state

    /// The placement whose arms a Decide on `placement` learns on: itself while the placements
    /// learned separately are fewer than `maxPlacements` (or it is one of them), else
    /// `ArmKey.otherPlacements`, shared by the rest. A client naming a new placement per call
    /// cannot grow the arms (memory, the file, the start) without bound.
    func learnedPlacement(_ placement: String) -> String {
        let limit = configuration.maxPlacements
        return memory.withLock { m in
            if m.learnedPlacements.contains(placement) { return placement }
            guard m.learnedPlacements.count < limit else { return ArmKey.otherPlacements }
            m.learnedPlacements.insert(placement)
            return placement
        }
    }

    /// The evidence for `keys` as of `nowMs`.
    func arms(_ keys: [ArmKey], nowMs: Int64) -> [Arm] {
        let halfLife = configuration.halfLifeMs
        return memory.withLock { m in keys.map { (m.arms[$0] ?? Arm()).decayed(to: nowMs, halfLifeMs: halfLife) } }
    }

    /// The learning state as the file holds it.
    static func loadArms(_ db: Database) throws -> [ArmKey: Arm] {
        var arms: [ArmKey: Arm] = [:]
        for row in try Row.fetchAll(db, sql: "SELECT action_id, context, successes, failures, updated_ms FROM arm") {
            arms[ArmKey(action: row["action_id"], context: row["context"])] =
                Arm(successes: row["successes"], failures: row["failures"], updatedMs: row["updated_ms"])
        }
        return arms
    }

    /// Adds evidence to arms in memory, inside a write transaction that then writes the arms
    /// named in `changed` (`writeArms`): a batch of decisions writes each arm once, not once
    /// per decision. A transaction that fails has memory read again from the file
    /// (`writeContacts`).
    private func addEvidence(_ changes: [(ArmKey, successes: Double, failures: Double)], atMs: Int64,
                             changed: inout Set<ArmKey>) {
        let halfLife = configuration.halfLifeMs
        memory.withLock { m in
            for (key, successes, failures) in changes {
                m.arms[key] = (m.arms[key] ?? Arm()).adding(successes: successes, failures: failures, atMs: atMs, halfLifeMs: halfLife)
            }
        }
        changed.formUnion(changes.lazy.map(\.0))
    }

    /// Writes the arms `keys` as memory holds them (only this transaction's writer changes them).
    private func writeArms(_ db: Database, _ keys: Set<ArmKey>) throws {
        guard !keys.isEmpty else { return }
        let arms = memory.withLock { m in keys.map { ($0, m.arms[$0] ?? Arm()) } }
        let statement = try db.cachedStatement(sql: """
            INSERT OR REPLACE INTO arm (action_id, context, successes, failures, updated_ms) VALUES (?, ?, ?, ?, ?)
            """)
        for (key, arm) in arms {
            try statement.execute(arguments: [key.action, key.context, arm.successes, arm.failures, arm.updatedMs])
        }
    }

    // MARK: - Decisions

    /// What a person was offered and did recently, for caps and suppressions.
    struct History: Sendable {
        var offers: [(action: String, channel: Int32, atMs: Int64)] = []
        var outcomes: [(action: String, kind: DecisionV1.Outcome, atMs: Int64)] = []
    }

    /// Offers of decisions not yet committed, by person: caps count them too.
    struct PendingOffer: Sendable {
        var decision: String
        var action: String
        var channel: Int32
        var atMs: Int64
        /// Written into `recent` by the transaction logging it (which has not returned yet).
        var inMemory = false
    }

    /// `person` after the identity feed's recent merges and every erasure: the survivor,
    /// itself, or nil when erased.
    func currentPerson(_ person: String) -> String? {
        contacts.withLock { $0.current(person) }
    }

    /// `person` after every merge the identity feed brought (`person_merged`, read from the
    /// file: for when the profile service cannot say who a person is now) and every erasure:
    /// the survivor, itself, or nil when erased.
    func survivorInFile(_ person: String) throws -> String? {
        let merged = try pool.read { db in
            let next = try db.cachedStatement(sql: "SELECT target FROM person_merged WHERE person_id = ?")
            return IdentityFeed.survivor(of: person) { try? String.fetchOne(next, arguments: [$0]) } ?? person
        }
        return currentPerson(merged)
    }

    /// Whether `history(person:sinceMs:)` answers from memory (else it reads the file). A cut
    /// may move the bound meanwhile: the answer is right either way, only slower.
    func historyInMemory(sinceMs: Int64) -> Bool {
        contacts.withLock { sinceMs >= $0.recent.coveredAfterMs }
    }

    /// The person's offers and outcomes since `sinceMs`, including offers still being logged:
    /// from memory when `recent` covers the time since then, else from the file.
    func history(person: String, sinceMs: Int64) throws -> History {
        let (pending, recent) = contacts.withLock { ($0.pending[person] ?? [], $0.recent.history(of: person, sinceMs: sinceMs)) }
        if var history = recent {
            for offer in pending where offer.atMs > sinceMs && !offer.inMemory {
                history.offers.append((offer.action, offer.channel, offer.atMs))
            }
            return history
        }
        // Pending first, then the file: an offer committed in between is in the file, and one
        // in both is counted once (by decision id).
        // Without a transaction (BEGIN and COMMIT were a quarter of this read's cost): each
        // SELECT is consistent on its own, and an outcome committed between the two is one this
        // decision could as well have read a moment later.
        return try pool.unsafeRead { db in
            var history = History()
            var seen = Set<String>()
            let offers = try Row.fetchCursor(db.cachedStatement(sql: "SELECT action_id, channel, at_ms, decision_id FROM offer WHERE person_id = ? AND at_ms > ? AND action_id != ''"),
                                             arguments: [person, sinceMs])
            while let row = try offers.next() {
                history.offers.append((row[0], row[1], row[2]))
                seen.insert(row[3])
            }
            for offer in pending where offer.atMs > sinceMs && !seen.contains(offer.decision) {
                history.offers.append((offer.action, offer.channel, offer.atMs))
            }
            let outcomes = try Row.fetchCursor(db.cachedStatement(sql: "SELECT action_id, kind, occurred_at_ms FROM outcome WHERE person_id = ? AND occurred_at_ms > ?"),
                                               arguments: [person, sinceMs])
            while let row = try outcomes.next() { history.outcomes.append((row[0], DecisionV1.Outcome(rawValue: row[1]), row[2])) }
            return history
        }
    }

    /// Marks a decision's offers as taken before it is logged, so that caps see them at once.
    func reserve(_ record: DecisionV1.DecisionRecord) {
        guard !record.personId.isEmpty, !record.actions.isEmpty else { return }
        contacts.withLock { contacts in
            // Merged away or erased since this Decide began: held by the survivor, or by no
            // one (the commit then logs it for them).
            guard let person = contacts.current(record.personId) else { return }
            contacts.pending[person, default: []] += record.actions.map {
                PendingOffer(decision: record.decisionId, action: $0.actionId, channel: $0.channel.rawValue, atMs: record.decidedAtMs)
            }
        }
    }

    /// Logs a decision durably: the record, an offer per chosen action (when the person is
    /// known) and, for each chosen action, one failure on its arms until a positive outcome
    /// turns it into a success. Decisions arriving together share one transaction (group
    /// commit); this returns once the transaction holding this one has committed.
    func log(_ record: DecisionV1.DecisionRecord, arms: [ArmKey]) async throws {
        let encoded = Self.stored(record)
        _ = try await log.submit(.decision(record, encoded: encoded, arms: arms)) { [self] entries in try commit(entries) }
    }

    /// A logged offer that routing delivered on another of the action's channels: caps count
    /// it on that channel from now on (the decision's record keeps the channel it chose).
    func rechannel(_ record: DecisionV1.DecisionRecord, action: String, from: CommonV1.Channel, to: CommonV1.Channel) throws {
        guard !record.personId.isEmpty else { return }
        try pool.writeThenUpdate { db in
            try db.execute(sql: "UPDATE offer SET channel = ? WHERE person_id = ? AND at_ms = ? AND decision_id = ? AND action_id = ?",
                           arguments: [to.rawValue, record.personId, record.decidedAtMs, record.decisionId, action])
            guard db.changesCount > 0 else { return ((), {}) }
            return ((), { [self] in
                contacts.withLock { $0.recent.rechannel(person: record.personId, action: action, atMs: record.decidedAtMs, from: from.rawValue, to: to.rawValue) }
            })
        }
    }

    /// Records an outcome once (a known outcome id is a duplicate: returns false) and learns
    /// from it: the first click or conversion on an offer turns its failure into a success;
    /// a dismiss, complaint or unsubscribe adds failures. Outcomes share the decisions'
    /// group commit; this returns once the outcome is committed.
    func report(_ outcome: DecisionV1.ReportOutcomeRequest, offered: Offered, atMs: Int64) async throws -> Bool {
        try await log.submit(.outcome(outcome, offered: offered, atMs: atMs)) { [self] entries in try commit(entries) }
    }

    /// Writes a batch of the log in one transaction, in order (an outcome's duplicate later in
    /// the same batch is a duplicate), then releases the decisions' reservations.
    private func commit(_ entries: [LogEntry]) throws -> [Bool] {
        defer { release(entries) }
        return try writeContacts { db in
            let decision = try db.cachedStatement(sql: "INSERT INTO decision (decision_id, person_id, decided_at_ms, record) VALUES (?, ?, ?, ?)")
            let offer = try db.cachedStatement(sql: "INSERT INTO offer (person_id, at_ms, action_id, channel, decision_id) VALUES (?, ?, ?, ?, ?)")
            // A merge or an erasure applied while a decision was being logged moved or dropped
            // its reservation: the decision is logged for the survivor, or for no one.
            // A decision that offered nothing, and an outcome, follow the recent merges and
            // erasures (`gone`) alike.
            let holders = contacts.withLock { contacts in
                entries.map { entry -> String? in
                    let person: String, holder: String
                    switch entry {
                    case .decision(let record, _, _) where !record.personId.isEmpty:
                        person = record.personId
                        holder = (record.actions.isEmpty ? contacts.current(person) : contacts.holder(of: record)) ?? ""
                    case .outcome(_, let offered, _) where !offered.personId.isEmpty:
                        person = offered.personId
                        holder = contacts.current(person) ?? ""
                    default:
                        return nil
                    }
                    return holder == person ? nil : holder
                }
            }
            // Re-encoded outside the lock, which Decide's history reads wait for.
            let entries = zip(entries, holders).map { entry, holder -> LogEntry in
                guard let holder else { return entry }
                switch entry {
                case .decision(var record, _, let arms):
                    record.personId = holder
                    // Erased meanwhile: logged for no one, and its request id forgotten as an
                    // erasure forgets the person's others (a retry is then NOT_FOUND).
                    if holder.isEmpty { (record.requestId, record.requestHash, record.requestPersonId) = ("", [], "") }
                    return .decision(record, encoded: Self.stored(record), arms: arms)
                case .outcome(let outcome, var offered, let atMs):
                    offered.personId = holder
                    return .outcome(outcome, offered: offered, atMs: atMs)
                }
            }
            var changedArms = Set<ArmKey>()
            let written = try entries.map { entry in
                switch entry {
                case .decision(let record, let encoded, let arms):
                    try decision.run(db, .text(record.decisionId), .text(record.personId), .integer(record.decidedAtMs), .blob(encoded))
                    if !record.requestId.isEmpty {
                        try db.cachedStatement(sql: "INSERT INTO decision_request (request_id, decision_id) VALUES (?, ?)")
                            .execute(arguments: [record.requestId, record.decisionId])
                    }
                    if !record.personId.isEmpty {
                        for action in record.actions {
                            try offer.run(db, .text(record.personId), .integer(record.decidedAtMs), .text(action.actionId), .integer(Int64(action.channel.rawValue)), .text(record.decisionId))
                        }
                        // Merges and erasures find a person's decisions through `offer`.
                        if record.actions.isEmpty { try offer.run(db, .text(record.personId), .integer(record.decidedAtMs), .text(""), .integer(0), .text(record.decisionId)) }
                    }
                    addEvidence(arms.map { ($0, 0, 1) }, atMs: record.decidedAtMs, changed: &changedArms)
                    return true
                case .outcome(let outcome, let offered, let atMs):
                    return try insert(db, outcome, offered: offered, atMs: atMs, changedArms: &changedArms)
                }
            }
            try writeArms(db, changedArms)
            // Built before taking the lock, which Decide's history reads wait for.
            let offered = entries.map { entry -> Offered? in
                guard case .decision(let record, _, _) = entry, Offered.takesOutcomes(record) else { return nil }
                return Offered(record)
            }
            contacts.withLock { contacts in
                for (i, (entry, new)) in zip(entries, written).enumerated() {
                    switch entry {
                    case .decision(let record, _, _) where Offered.takesOutcomes(record):
                        contacts.decisions.insert(record.decisionId, offered[i]!)
                        guard !record.personId.isEmpty else { break }
                        for action in record.actions {
                            contacts.recent.addOffer(person: record.personId, action: action.actionId,
                                                     channel: action.channel.rawValue, atMs: record.decidedAtMs)
                        }
                        if var offers = contacts.pending[record.personId] {
                            for i in offers.indices where offers[i].decision == record.decisionId { offers[i].inMemory = true }
                            contacts.pending[record.personId] = offers
                        }
                    case .outcome(let outcome, let offered, let atMs) where new && !offered.personId.isEmpty:
                        contacts.recent.addOutcome(person: offered.personId, action: outcome.actionId, kind: outcome.outcome, atMs: atMs)
                    default:
                        break
                    }
                }
            }
            return written
        }
    }

    /// `pool.write` for transactions that change memory as they go (`recent`, the arms): when
    /// one fails, memory may hold what the file does not, and is read again from the file.
    private func writeContacts<T>(_ body: (Database) throws -> T) throws -> T {
        do {
            return try pool.write(body)
        } catch {
            func replace(_ recent: RecentHistory, arms: [ArmKey: Arm]?) {
                if let arms { memory.withLock { $0.arms = arms } }
                // What memory held is freed after the lock is released (see takeAll).
                let held = contacts.withLock { contacts in
                    let held = (contacts.recent, contacts.decisions.takeAll())
                    contacts.recent = recent
                    for (person, offers) in contacts.pending {
                        contacts.pending[person] = offers.map { var offer = $0; offer.inMemory = false; return offer }
                    }
                    return held
                }
                withExtendedLifetime(held) {}
            }
            do {
                // On the writer, so that no commit lands between the read and the swap.
                try pool.writeWithoutTransaction { db in
                    replace(try RecentHistory.load(db, limit: contacts.withLock { $0.recent.limit }), arms: try Self.loadArms(db))
                }
            } catch {
                // A file that cannot be read either: every history from the file; the arms as
                // they are (at worst ahead by the failed batch's evidence until a restart).
                replace(RecentHistory(limit: 0), arms: nil)
            }
            throw error
        }
    }

    /// Undoes a logged decision that its caller never received (the server answered
    /// DEADLINE_EXCEEDED and cancelled the call, or the connection closed, while it was being
    /// logged): its record, its offers (so no cap counts them) and its arms' failures go, as
    /// for a decision abandoned before the log.
    func void(_ record: DecisionV1.DecisionRecord, arms: [ArmKey]) throws {
        try writeContacts { db in
            // Whoever holds it now, as the file says (the survivor of a merge since, the person
            // again after an unmerge; no row after an erasure): its offers are held alike.
            let holder = try String.fetchOne(db, sql: "SELECT person_id FROM decision WHERE decision_id = ?", arguments: [record.decisionId])
                .flatMap { $0.isEmpty ? nil : $0 }
            try db.execute(sql: "DELETE FROM decision WHERE decision_id = ?", arguments: [record.decisionId])
            if let holder {
                try db.execute(sql: "DELETE FROM offer WHERE person_id = ? AND at_ms = ? AND decision_id = ?",
                               arguments: [holder, record.decidedAtMs, record.decisionId])
            }
            var changed = Set<ArmKey>()
            addEvidence(arms.map { ($0, 0, -1) }, atMs: record.decidedAtMs, changed: &changed)
            try writeArms(db, changed)
            try contacts.withLock { contacts in
                _ = contacts.decisions.remove(record.decisionId)
                if let holder { try contacts.recent.reload(holder, from: db) }
            }
        }
    }

    /// Drops the reservations of a decision that will not be logged (its caller gave up).
    func abandon(_ record: DecisionV1.DecisionRecord) {
        release([.decision(record, encoded: Data(), arms: [])])
    }

    /// Drops the reservations of logged (or failed) decisions: from now on caps read them from the store.
    private func release(_ entries: [LogEntry]) {
        contacts.withLock { contacts in
            for case .decision(let record, _, _) in entries where !record.personId.isEmpty && !record.actions.isEmpty {
                // A merge while the decision was being logged moved its reservation.
                guard let holder = contacts.holder(of: record) else { continue }
                contacts.pending[holder]?.removeAll { $0.decision == record.decisionId }
                if contacts.pending[holder]?.isEmpty == true { contacts.pending[holder] = nil }
            }
        }
    }

    /// What an outcome on decision `id` needs: from memory for the latest decisions, else
    /// from the file (nil when there is no such decision).
    func offered(_ id: String) throws -> Offered? {
        if let offered = recentlyOffered(id) { return offered }
        return try decision(id).map(Offered.init)
    }

    /// `offered` from memory only: nil when the decision is not among the latest.
    func recentlyOffered(_ id: String) -> Offered? {
        contacts.withLock { $0.decisions[id] }
    }

    public func decision(_ id: String) throws -> DecisionV1.DecisionRecord? {
        // Every ReportOutcome reads one: a cached statement, and no transaction around a single
        // SELECT (the parse and BEGIN/COMMIT were a third of this read's cost under load).
        try pool.unsafeRead { db in
            try Data.fetchOne(db.cachedStatement(sql: "SELECT record FROM decision WHERE decision_id = ?"), arguments: [id])
                .map { try Self.record(stored: $0) }
        }
    }

    /// The logged decision a Decide with request id `id` made, if the log still holds it.
    func decision(requestId id: String) throws -> DecisionV1.DecisionRecord? {
        try pool.read { db in
            try Data.fetchOne(db, sql: """
                SELECT d.record FROM decision_request r JOIN decision d ON d.decision_id = r.decision_id WHERE r.request_id = ?
                """, arguments: [id]).map { try Self.record(stored: $0) }
        }
    }

    /// A record as the `decision` table stores it: compressed (`BlobCompression`). With fifty
    /// candidates explained, a record is ~4.6 KB, ~1.9 KB compressed; every byte is written
    /// to the WAL and again by a checkpoint (compressed in a rowid table, a decision takes
    /// 2.9 KB of the file instead of 5.5 KB).
    static func stored(_ record: DecisionV1.DecisionRecord) -> Data {
        Data(BlobCompression.compress(record.serializedBytes()))
    }

    /// A record read from the `decision` table (compressed, or plain as stored before).
    static func record(stored blob: Data) throws -> DecisionV1.DecisionRecord {
        try DecisionV1.DecisionRecord(serializedBytes: BlobCompression.decompress(blob))
    }

    /// `report`'s write: false when the outcome id is known.
    private func insert(_ db: Database, _ outcome: DecisionV1.ReportOutcomeRequest, offered: Offered,
                        atMs: Int64, changedArms: inout Set<ArmKey>) throws -> Bool {
        try db.cachedStatement(sql: """
            INSERT OR IGNORE INTO outcome (outcome_id, decision_id, person_id, action_id, kind, value, occurred_at_ms)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            """).execute(arguments: [outcome.outcomeId, outcome.decisionId, offered.personId, outcome.actionId,
                                     outcome.outcome.rawValue, outcome.value, atMs])
        guard db.changesCount > 0 else { return false }
        let keys = offered.arms[outcome.actionId] ?? []
        // Whether this is the offer's first outcome among `kinds`: each kind of evidence counts
        // once per offer, however many outcome ids report it (a client retrying with a fresh
        // id, or reporting a dismiss on every render, would otherwise bury the action).
        func first(of kinds: DecisionV1.Outcome...) throws -> Bool {
            try Int.fetchOne(db.cachedStatement(sql: """
                SELECT count(*) FROM outcome WHERE decision_id = ? AND action_id = ? AND kind IN (?, ?)
                """), arguments: [outcome.decisionId, outcome.actionId, kinds[0].rawValue, kinds[kinds.count - 1].rawValue]) == 1
        }
        switch outcome.outcome {
        case .click, .conversion:
            // The offer becomes a success instead of the failure it counted as since the
            // decision: both dated then, so the failure taken back is the one added, as decayed
            // since (taken back at full weight, a conversion days later removed more failure
            // than was left, and slow-converting actions looked better than they are).
            if try first(of: .click, .conversion) { addEvidence(keys.map { ($0, 1, -1) }, atMs: offered.decidedAtMs, changed: &changedArms) }
        case .dismiss:
            if try first(of: .dismiss) { addEvidence(keys.map { ($0, 0, configuration.dismissWeight) }, atMs: atMs, changed: &changedArms) }
        case .complaint, .unsubscribe:
            if try first(of: .complaint, .unsubscribe) {
                addEvidence(keys.map { ($0, 0, configuration.complaintWeight) }, atMs: atMs, changed: &changedArms)
            }
        default:
            break
        }
        return true
    }
}

// MARK: - The identity change feed

extension DecisionStore: IdentityChangeSink {
    public func identityCursor() throws -> Int64 {
        try pool.read { db in try Int64.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'identity_seq'") ?? 0 }
    }

    /// Merges move the absorbed persons' decisions, offers and outcomes to the survivor
    /// (caps and suppressions then count them together), each decision keeping whom it was
    /// made for. An unmerge gives the split person back its decisions and those of the persons
    /// it had absorbed, with their offers and outcomes. Erasures delete the persons' decisions
    /// wherever a merge moved them, with their offers and outcomes. The learned evidence per
    /// action is an aggregate over everyone and stays.
    public func apply(_ changes: [(seq: Int64, change: IdentityChange)], nowMs: Int64) throws {
        guard !changes.isEmpty else { return }
        var erased = false
        var newlyErased: [String] = []
        // Reservations of decisions in flight that merges moved, moved back if the transaction
        // fails (an erasure's dropped ones are not put back: those decisions are logged for no one).
        var moves: [(from: String, to: String, ids: Set<String>)] = []
        // The changes this transaction applied (not those an earlier poll applied), for undoing.
        var applied: [IdentityChange] = []
        do {
            try writeContacts { db in
                let cursor = try Int64.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'identity_seq'") ?? 0
                for (seq, change) in changes where seq > cursor {
                    applied.append(change)
                    switch change {
                    case .merge(let target, let sources):
                        for source in sources where source != target && !source.isEmpty {
                            let moved = try merge(db, source, into: target)
                            if !moved.isEmpty { moves.append((source, target, moved)) }
                        }
                    case .erase(let person, let absorbed):
                        for p in [person] + absorbed where !p.isEmpty {
                            // Its decisions a merge moved to another person go too: that person's
                            // history in memory is read again without them.
                            // (An outcome is deleted with its decision, also one logged for
                            // another person: reported while an unmerge was under way.)
                            let decisions = "SELECT decision_id FROM offer WHERE person_id = ?1 UNION SELECT decision_id FROM offer WHERE origin_person_id = ?1"
                            let holders = try String.fetchAll(db, sql: """
                                SELECT person_id FROM offer WHERE origin_person_id = ?1 AND person_id <> ?1
                                UNION SELECT person_id FROM outcome WHERE decision_id IN (\(decisions)) AND person_id <> ?1
                                """, arguments: [p])
                            try db.execute(sql: "DELETE FROM decision WHERE decision_id IN (\(decisions))", arguments: [p])
                            try db.execute(sql: "DELETE FROM outcome WHERE decision_id IN (\(decisions))", arguments: [p])
                            try db.execute(sql: "DELETE FROM outcome WHERE person_id = ?", arguments: [p])
                            try db.execute(sql: "DELETE FROM offer WHERE origin_person_id = ?", arguments: [p])
                            try db.execute(sql: "DELETE FROM offer WHERE person_id = ?", arguments: [p])
                            try db.execute(sql: "INSERT OR IGNORE INTO person_erased (person_id) VALUES (?)", arguments: [p])
                            // Only its own row: a person merged into it keeps its row until its
                            // own erasure, so that it reads as erased meanwhile (an erasure's
                            // persons may come over several changes).
                            try db.execute(sql: "DELETE FROM person_merged WHERE person_id = ?", arguments: [p])
                            try contacts.withLock { contacts in
                                if contacts.erased.insert(p).inserted { newlyErased.append(p) }
                                contacts.recent.remove(p)
                                contacts.pending[p] = nil  // its decisions in flight are logged for no one
                                for holder in holders { try contacts.recent.reload(holder, from: db) }
                            }
                        }
                        erased = true
                    case .unmerge(_, let split):
                        try unmerge(db, split)
                    case .other:
                        break
                    }
                }
                try db.execute(sql: "INSERT OR REPLACE INTO meta (key, value) VALUES ('identity_seq', ?)",
                               arguments: [max(cursor, changes.map(\.seq).max()!)])
                // The latest decisions' persons may have changed: ReportOutcome reads them from the
                // file until new decisions come (merges and erasures are rare).
                if changes.contains(where: { if case .other = $0.change { false } else { true } }) {
                    let held = contacts.withLock { $0.decisions.takeAll() }
                    withExtendedLifetime(held) {}  // freed here, not under the lock
                }
            }
        } catch {
            contacts.withLock { contacts in
                // Not merged or erased after all (the feed brings the changes again): undone
                // last first, so that a merge and an unmerge of the same person leave it as before.
                for change in applied.reversed() {
                    switch change {
                    case .merge(_, let sources): sources.forEach { contacts.gone.remove($0) }
                    case .unmerge(let survivor, let split): _ = contacts.gone.insert(split, survivor)
                    case .erase, .other: break
                    }
                }
                for p in newlyErased { contacts.erased.remove(p) }
                for move in moves.reversed() {
                    var back: [PendingOffer] = []
                    contacts.pending[move.to]?.removeAll { offer in
                        guard move.ids.contains(offer.decision) else { return false }
                        back.append(offer)
                        return true
                    }
                    if contacts.pending[move.to]?.isEmpty == true { contacts.pending[move.to] = nil }
                    if !back.isEmpty { contacts.pending[move.from, default: []] += back }
                }
            }
            throw error
        }
        if erased {
            truncation.owe()
            // Up to 1 s for the readers to move on (every Decide's log waits for the writer
            // meanwhile); failing that, `truncationRetrier` tries again.
            try? truncation.pay(pool, patience: .seconds(1))
        }
    }

    /// Keeps the log to `retentionDays` (`decision.logRetentionDays`): deletes the older
    /// decisions with their offers and outcomes (`pruneLog`), `batch` at a time, every `interval`.
    public func pruner(retentionDays: Int, interval: Duration = .seconds(60), batch: Int = 1000,
                       logger: Logger, clock: @escaping @Sendable () -> Int64) -> RetentionPruner {
        RetentionPruner("decision log", retentionDays: retentionDays, interval: interval, batch: batch, logger: logger, clock: clock) { [self] in
            let deleted = try pruneLog(beforeMs: $0, limit: $1)
            return (deleted, deleted >= $1)
        }
    }

    /// Deletes up to `limit` decisions made before `beforeMs` with their offers, and up to
    /// `limit` outcomes of such decisions that occurred before it too (a later outcome stays
    /// while suppressions may read it). Returns how many decisions and outcomes went; call
    /// again while that is `limit` or more.
    func pruneLog(beforeMs: Int64, limit: Int) throws -> Int {
        let bound = TimeOrderedID.lowerBound(Self.decisionIDPrefix, atMs: beforeMs)
        return try pool.write { db in
            let rows = try Row.fetchAll(db.cachedStatement(sql: """
                SELECT decision_id, person_id, decided_at_ms FROM decision WHERE decision_id < ? ORDER BY decision_id LIMIT ?
                """), arguments: [bound, limit])
            let offers = try db.cachedStatement(sql: "DELETE FROM offer WHERE person_id = ? AND at_ms = ? AND decision_id = ?")
            let decision = try db.cachedStatement(sql: "DELETE FROM decision WHERE decision_id = ?")
            for row in rows {
                let id: String = row[0]
                let person: String = row[1]
                if !person.isEmpty { try offers.execute(arguments: [person, row[2] as Int64, id]) }
                try decision.execute(arguments: [id])
            }
            contacts.withLock { contacts in for row in rows { contacts.decisions.remove(row[0]) } }
            try db.cachedStatement(sql: """
                DELETE FROM outcome WHERE outcome_id IN
                  (SELECT outcome_id FROM outcome WHERE decision_id < ? AND occurred_at_ms < ? LIMIT ?)
                """).execute(arguments: [bound, beforeMs, limit])
            return rows.count + db.changesCount
        }
    }

    /// Gives `split` back the decisions made for it or for a person it had absorbed (it comes
    /// back with them, as the identity service gives their identifiers back), with their
    /// offers and outcomes, wherever merges moved them; the histories in memory of every
    /// person concerned are read again.
    private func unmerge(_ db: Database, _ split: String) throws {
        let absorbed = try String.fetchAll(db, sql: """
            WITH RECURSIVE absorbed(person_id) AS (
              SELECT person_id FROM person_merged WHERE target = ?1
              UNION SELECT m.person_id FROM person_merged m JOIN absorbed a ON m.target = a.person_id)
            SELECT person_id FROM absorbed
            """, arguments: [split])
        try db.execute(sql: "DELETE FROM person_merged WHERE person_id = ?", arguments: [split])
        var concerned: Set<String> = [split]
        for origin in [split] + absorbed {
            concerned.formUnion(try String.fetchAll(db, sql: "SELECT DISTINCT person_id FROM offer WHERE origin_person_id = ?", arguments: [origin]))
            let moved = "SELECT decision_id FROM offer WHERE origin_person_id = ?"
            for row in try Row.fetchAll(db, sql: "SELECT decision_id, record FROM decision WHERE decision_id IN (\(moved))", arguments: [origin]) {
                try Self.reassign(db, decision: row[0], record: row[1], to: split)
            }
            try db.execute(sql: "UPDATE outcome SET person_id = ? WHERE decision_id IN (\(moved))", arguments: [split, origin])
            // Back to the split person; its own need no origin any more, its absorbed persons' keep theirs.
            try db.execute(sql: "UPDATE offer SET person_id = ?1, origin_person_id = nullif(origin_person_id, ?1) WHERE origin_person_id = ?2",
                           arguments: [split, origin])
        }
        try contacts.withLock { contacts in
            _ = contacts.gone.remove(split)  // it is a person again
            for person in concerned { try contacts.recent.reload(person, from: db) }
        }
    }

    /// Gives a logged decision to `person`: its row, and the person in its record. A record
    /// that does not decode (damaged) keeps its bytes and moves by its row alone: one bad
    /// record must not fail the feed's transaction at every poll, holding back every merge
    /// and erasure after it.
    static func reassign(_ db: Database, decision: String, record blob: Data, to person: String) throws {
        guard var record = try? Self.record(stored: blob) else {
            try db.execute(sql: "UPDATE decision SET person_id = ? WHERE decision_id = ?", arguments: [person, decision])
            return
        }
        record.personId = person
        try db.execute(sql: "UPDATE decision SET person_id = ?, record = ? WHERE decision_id = ?",
                       arguments: [person, Self.stored(record), decision])
    }

    /// Returns the decisions in flight whose reservations moved to `target`.
    private func merge(_ db: Database, _ source: String, into target: String) throws -> Set<String> {
        let rows = try Row.fetchAll(db, sql: """
            SELECT decision_id, record FROM decision WHERE decision_id IN (SELECT decision_id FROM offer WHERE person_id = ?)
            """, arguments: [source])
        for row in rows { try Self.reassign(db, decision: row[0], record: row[1], to: target) }
        try db.execute(sql: "UPDATE OR IGNORE offer SET origin_person_id = coalesce(origin_person_id, person_id), person_id = ? WHERE person_id = ?",
                       arguments: [target, source])
        try db.execute(sql: "DELETE FROM offer WHERE person_id = ?", arguments: [source])
        try db.execute(sql: "UPDATE outcome SET person_id = ? WHERE person_id = ?", arguments: [target, source])
        try db.execute(sql: "INSERT OR REPLACE INTO person_merged (person_id, target) VALUES (?, ?)", arguments: [source, target])
        return contacts.withLock { contacts in
            contacts.gone.insert(source, target)
            contacts.recent.move(source, to: target)
            guard let moved = contacts.pending.removeValue(forKey: source) else { return [] }
            contacts.pending[target, default: []] += moved
            return Set(moved.map(\.decision))
        }
    }
}
