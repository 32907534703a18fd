import Contracts
import Foundation
import GRDB
import Logging
import IdentityFeed
import RPC
import Rules
import Storage
import Synchronization

/// The routing service's SQLite store: the outbox (every delivery, its plan, attempts and
/// events), engagement evidence per person and channel and per local hour (person "" is
/// the population), hard-bounced addresses, and unsubscribes and complaints waiting to be
/// passed on to the profile service.
///
/// Deliveries are stored whole (`arbiter.routing.v1.Delivery`) with the columns the
/// outbox is searched by. Database access is synchronous on the calling thread; the
/// service runs its handlers on the concurrent pool.
public final class RoutingStore: Sendable {
    let pool: DatabasePool
    /// Keeps the WAL short from its own connection (see BackgroundCheckpointer).
    let checkpointer: BackgroundCheckpointer
    /// The WAL truncation an erasure from the identity feed owes (see `truncationRetrier`).
    let truncation = OwedTruncation()
    let configuration: RoutingConfiguration
    /// The population's engagement, mirrored in memory (changed only inside write transactions).
    let population: Mutex<Evidence>
    let inserts = GroupCommit<Insert, Inserted>(label: "arbiter.routing.route")
    let updates = GroupCommit<Update, RoutingV1.Delivery?>(label: "arbiter.routing.dispatch")
    /// Where `pruneOutbox`'s next call goes on from ("": the start).
    let pruneResume = Mutex("")

    public init(directory: String, configuration: RoutingConfiguration = .init()) throws {
        (pool, checkpointer) = try SQLiteStore.openWithCheckpointer(directory: directory, name: "routing", migrator: Self.migrator)
        self.configuration = configuration
        population = Mutex(try pool.read { db in try Self.evidence(db, person: "") })
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
                CREATE TABLE delivery (
                  delivery_id TEXT PRIMARY KEY,              -- time-ordered
                  idempotency_key TEXT NOT NULL UNIQUE,
                  request_hash BLOB NOT NULL,                -- SHA-256 of the request, to refuse a reused key
                  person_id TEXT NOT NULL,
                  state INTEGER NOT NULL,                    -- Delivery.State
                  channel INTEGER NOT NULL,
                  send_at_ms INTEGER NOT NULL,
                  next_attempt_ms INTEGER NOT NULL,
                  record BLOB NOT NULL                       -- arbiter.routing.v1.Delivery
                ) WITHOUT ROWID;
                CREATE INDEX delivery_due ON delivery(next_attempt_ms) WHERE state = 1;
                CREATE INDEX delivery_by_person ON delivery(person_id, send_at_ms);
                CREATE TABLE delivery_event (               -- each reported kind once per delivery
                  delivery_id TEXT NOT NULL, kind INTEGER NOT NULL, at_ms INTEGER NOT NULL,
                  PRIMARY KEY (delivery_id, kind)
                ) WITHOUT ROWID;
                CREATE TABLE engagement (                  -- key: channel 1-5, or 100 + local hour
                  person_id TEXT NOT NULL, key INTEGER NOT NULL,
                  sends REAL NOT NULL, engaged REAL NOT NULL, updated_ms INTEGER NOT NULL,
                  PRIMARY KEY (person_id, key)
                ) WITHOUT ROWID;
                CREATE TABLE unreachable (
                  person_id TEXT NOT NULL, channel INTEGER NOT NULL, address TEXT NOT NULL, at_ms INTEGER NOT NULL,
                  PRIMARY KEY (person_id, channel, address)
                ) WITHOUT ROWID;
                CREATE TABLE opt_out (                     -- unsubscribes and complaints
                  person_id TEXT NOT NULL, purpose TEXT NOT NULL, channel INTEGER NOT NULL,
                  at_ms INTEGER NOT NULL, source TEXT NOT NULL,
                  synced INTEGER NOT NULL,                   -- 1 once the profile service recorded the denial
                  PRIMARY KEY (person_id, purpose, channel)
                ) WITHOUT ROWID;
                CREATE INDEX opt_out_unsynced ON opt_out(at_ms) WHERE synced = 0;
                """)
        }
        migrator.registerMigration("v2: events per channel, erased persons") { db in
            // Each reported kind once per delivery and channel (a bounce on a fallback channel
            // counts too), and a hard bounce apart from a soft one (`eventKey`). Rows from
            // before are taken as reported on the delivery's current channel.
            try db.execute(sql: """
                CREATE TABLE delivery_event_v2 (
                  delivery_id TEXT NOT NULL, channel INTEGER NOT NULL, kind INTEGER NOT NULL, at_ms INTEGER NOT NULL,
                  PRIMARY KEY (delivery_id, channel, kind)
                ) WITHOUT ROWID;
                INSERT OR IGNORE INTO delivery_event_v2 (delivery_id, channel, kind, at_ms)
                  SELECT e.delivery_id, d.channel, e.kind, e.at_ms FROM delivery_event e JOIN delivery d USING (delivery_id);
                DROP TABLE delivery_event;
                ALTER TABLE delivery_event_v2 RENAME TO delivery_event;
                CREATE TABLE person_erased (person_id TEXT PRIMARY KEY) WITHOUT ROWID;  -- no delivery is stored for them again
                """)
        }
        migrator.registerMigration("v3: when an opt-out was learned") { db in
            // A delivery is judged again at send time against the opt-outs this service learned
            // after planning it: by when they were recorded here, not by when they happened (a
            // provider reports an unsubscribe minutes late; a merge brings older ones).
            try db.execute(sql: """
                ALTER TABLE opt_out ADD COLUMN recorded_at_ms INTEGER NOT NULL DEFAULT 0;
                UPDATE opt_out SET recorded_at_ms = at_ms;
                """)
        }
        migrator.registerMigration("v4: dead letters by id, due deliveries by channel") { db in
            // ListDeliveries lists every dead letter, newest first, without scanning the outbox;
            // while a circuit holds some channels, the dispatcher reads the others' due
            // deliveries without walking the held backlog.
            try db.execute(sql: """
                CREATE INDEX delivery_dead ON delivery(delivery_id) WHERE state = 5;
                CREATE INDEX delivery_due_by_channel ON delivery(channel, next_attempt_ms) WHERE state = 1;
                """)
        }
        migrator.registerMigration("v5: whom a merged delivery was routed for") { db in
            // A merge keeps, on each delivery it moves, the person it was routed for, so that an
            // unmerge gives it back and an erasure of that person finds it under the survivor.
            // Merges applied before this version are not known here: their deliveries stay with
            // the survivor.
            try db.execute(sql: """
                ALTER TABLE delivery ADD COLUMN origin_person_id TEXT;  -- NULL: routed for person_id
                CREATE INDEX delivery_by_origin ON delivery(origin_person_id) WHERE origin_person_id IS NOT NULL;
                CREATE TABLE person_merged (person_id TEXT PRIMARY KEY, target TEXT NOT NULL) WITHOUT ROWID;
                """)
        }
        migrator.registerMigration("v6: persons merged, by target") { db in
            // An unmerge finds the persons the split person had absorbed without a scan.
            try db.execute(sql: "CREATE INDEX person_merged_by_target ON person_merged(target)")
        }
        migrator.registerMigration("v7: whose bounced address") { db in
            // A bounced address holds a person's address: a merge keeps whose it was, so that an
            // unmerge gives it back and an erasure of that person finds it under the survivor.
            // Two persons' rows for one address stay apart ('' : the holder's own). Rows from
            // before are the holder's own.
            try db.execute(sql: """
                CREATE TABLE unreachable_v7 (
                  person_id TEXT NOT NULL, channel INTEGER NOT NULL, address TEXT NOT NULL, at_ms INTEGER NOT NULL,
                  origin_person_id TEXT NOT NULL DEFAULT '',
                  PRIMARY KEY (person_id, channel, address, origin_person_id)
                ) WITHOUT ROWID;
                INSERT INTO unreachable_v7 (person_id, channel, address, at_ms) SELECT person_id, channel, address, at_ms FROM unreachable;
                DROP TABLE unreachable;
                ALTER TABLE unreachable_v7 RENAME TO unreachable;
                CREATE INDEX unreachable_by_origin ON unreachable(origin_person_id) WHERE origin_person_id <> '';
                """)
        }
        return migrator
    }

    // MARK: - Reading

    /// `engagement: false` leaves it out (the send-time check reads opt-outs and bounces only).
    /// `contactsAround`: the person's contacts within a week of it are read too, and up to a
    /// week past `contactsThrough` when that is later (a late message may wait until then).
    static func evidence(_ db: Database, person: String, engagement: Bool = true, contactsAround: Int64? = nil,
                         contactsThrough: Int64 = 0) throws -> Evidence {
        var evidence = Evidence()
        if engagement {
            for row in try Row.fetchAll(db.cachedStatement(sql: "SELECT key, sends, engaged, updated_ms FROM engagement WHERE person_id = ?"),
                                        arguments: [person]) {
                evidence.engagement[row[0]] = Engagement(sends: row[1], engaged: row[2], updatedMs: row[3])
            }
        }
        guard !person.isEmpty else { return evidence }
        for row in try Row.fetchAll(db.cachedStatement(sql: "SELECT purpose, channel, at_ms, recorded_at_ms FROM opt_out WHERE person_id = ?"),
                                    arguments: [person]) {
            evidence.optOuts.append((row[0], row[1], row[2], row[3]))
        }
        for row in try Row.fetchAll(db.cachedStatement(sql: "SELECT channel, address FROM unreachable WHERE person_id = ?"), arguments: [person]) {
            evidence.unreachable.insert(Evidence.unreachableKey(CommonV1.Channel(rawValue: row[0]), row[1]))
        }
        if let t = contactsAround {
            // A late delivery's send_at_ms is when it was sent (`save`). Scheduled ones planned
            // before t are late too: each is checked when it goes.
            let week: Int64 = 7 * 86_400_000
            evidence.contacts = try Row.fetchAll(db.cachedStatement(sql: """
                SELECT channel, send_at_ms FROM delivery WHERE person_id = ?1 AND send_at_ms > ?2 - ?3 AND send_at_ms < ?4 + ?3
                  AND (state = 3 OR (state = 1 AND send_at_ms > ?2))
                """), arguments: [person, t, week, max(t, contactsThrough)]).map { ($0[0], $0[1]) }
        }
        return evidence
    }

    /// What the store knows about a person, and about the population.
    func evidence(person: String) throws -> (person: Evidence, population: Evidence) {
        (try pool.read { db in try Self.evidence(db, person: person) }, population.withLock { $0 })
    }

    static func record(_ data: Data) throws -> RoutingV1.Delivery { try RoutingV1.Delivery(serializedBytes: data) }

    public func delivery(_ id: String) throws -> RoutingV1.Delivery? {
        try pool.read { db in try Self.load(db, id) }
    }

    static func load(_ db: Database, _ id: String) throws -> RoutingV1.Delivery? {
        try Data.fetchOne(db.cachedStatement(sql: "SELECT record FROM delivery WHERE delivery_id = ?"), arguments: [id]).map(record)
    }

    func delivery(idempotencyKey key: String) throws -> (RoutingV1.Delivery, Data)? {
        try pool.read { db in
            try Row.fetchOne(db.cachedStatement(sql: "SELECT record, request_hash FROM delivery WHERE idempotency_key = ?"), arguments: [key])
                .map { (try Self.record($0[0]), $0[1]) }
        }
    }

    /// Deliveries newest first (by creation: delivery ids are time-ordered; send times are
    /// not, and a suppressed delivery has none): a person's, or without a person every one in
    /// `state` (meant for dead letters, which have an index), older than the id `before`.
    /// At most `limit`, and no more than fit in an answer (`AnswerSize`), read and decoded
    /// only as far as they fit; `more` says whether others follow.
    func deliveries(person: String?, state: RoutingV1.Delivery.State?, before: String?, limit: Int) throws
        -> (deliveries: [RoutingV1.Delivery], more: Bool) {
        var conditions: [String] = []
        var arguments: StatementArguments = []
        if let person {
            conditions.append("person_id = ?")
            _ = arguments.append(contentsOf: [person])
        }
        // A number of an enum, written into the statement so that the partial index applies.
        if let state { conditions.append("state = \(state.rawValue)") }
        if let before {
            conditions.append("delivery_id < ?")
            _ = arguments.append(contentsOf: [before])
        }
        precondition(person != nil || state != nil, "deliveries of every person in every state are not listed")
        let sql = "SELECT record FROM delivery WHERE \(conditions.joined(separator: " AND ")) ORDER BY delivery_id DESC LIMIT \(limit + 1)"
        return try pool.read { db in
            // Read one at a time, up to the first that does not fit: a record may be ~1.6 MB
            // (a hundred variables of 16 KiB), and reading `limit` of them first held gigabytes.
            let cursor = try Data.fetchCursor(db.cachedStatement(sql: sql), arguments: arguments)
            var records: [Data] = []
            var failure: (any Error)?
            let sizes = AnyIterator<Int> {
                do {
                    guard let record = try cursor.next() else { return nil }
                    records.append(record)
                    return record.count
                } catch {
                    failure = error
                    return nil
                }
            }
            let fit = AnswerSize.fitting(IteratorSequence(sizes).prefix(limit))
            if let failure { throw failure }
            let more = try records.count > fit || cursor.next() != nil
            return (try records.prefix(fit).map(Self.record), more)
        }
    }

    /// Up to `limit` scheduled deliveries whose next attempt is due, oldest first, leaving
    /// out those in `excluding` (the attempts in flight) without decoding them, and those on
    /// the channels `skipping` (whose circuit is open).
    func due(nowMs: Int64, limit: Int, excluding: Set<String> = [], skipping: Set<CommonV1.Channel> = [],
             busy: Set<String> = []) throws -> [RoutingV1.Delivery] {
        // The persons with an attempt in flight (`busy`) are left out in the statement, so
        // that one person's backlog does not fill every read.
        let notBusy = busy.isEmpty ? "" : " AND person_id NOT IN (\(Array(repeating: "?", count: busy.count).joined(separator: ",")))"
        let busyArguments = StatementArguments(busy.sorted())
        return try pool.read { db in
            let wanted = limit + excluding.count
            let ids: [String]
            if skipping.isEmpty {
                ids = try String.fetchAll(db.cachedStatement(sql: """
                    SELECT delivery_id FROM delivery WHERE state = 1 AND next_attempt_ms <= ?\(notBusy) ORDER BY next_attempt_ms LIMIT ?
                    """), arguments: [nowMs] + busyArguments + [wanted])
            } else {
                // Channel by channel (delivery_due_by_channel), the oldest of them all first:
                // the backlog a circuit holds is not walked at every poll.
                var rows: [(id: String, at: Int64)] = []
                for channel in Planner.allChannels where !skipping.contains(channel) {
                    rows += try Row.fetchAll(db.cachedStatement(sql: """
                        SELECT delivery_id, next_attempt_ms FROM delivery
                        WHERE state = 1 AND channel = ? AND next_attempt_ms <= ?\(notBusy) ORDER BY next_attempt_ms LIMIT ?
                        """), arguments: [channel.rawValue, nowMs] + busyArguments + [wanted]).map { ($0[0], $0[1]) }
                }
                ids = rows.sorted { $0.at < $1.at }.prefix(wanted).map(\.id)
            }
            return try ids.lazy.filter { !excluding.contains($0) }.prefix(limit).compactMap { try Self.load(db, $0) }
        }
    }

    /// How many deliveries are waiting in the outbox (scheduled), and how many are dead letters.
    public func counts() throws -> (scheduled: Int, deadLetters: Int) {
        try pool.read { db in
            (try Int.fetchOne(db, sql: "SELECT count(*) FROM delivery WHERE state = 1") ?? 0,
             try Int.fetchOne(db, sql: "SELECT count(*) FROM delivery WHERE state = 5") ?? 0)
        }
    }

    // MARK: - Storing a planned delivery (idempotency and caps)

    struct Insert: Sendable {
        var person: String
        var idempotencyKey: String
        var requestHash: Data
        var nowMs: Int64
        /// Plans the delivery from the person's evidence and the population's.
        var plan: @Sendable (_ person: Evidence, _ population: Evidence) -> RoutingV1.Delivery
    }

    enum Inserted: Sendable {
        case stored(RoutingV1.Delivery)
        /// The idempotency key was known; `sameRequest` is false when its first request differed.
        case existing(RoutingV1.Delivery, sameRequest: Bool)
        /// The identity feed erased the person while the Route was on its way: nothing stored.
        case personErased
    }

    /// Plans and stores a delivery once per idempotency key, in one transaction: the
    /// evidence `plan` reads (engagement, opt-outs, hard bounces) is the one current when
    /// the delivery is stored. A normal delivery is checked against the caps in the same
    /// transaction (so concurrent Routes for one person cannot both take the last slot): a
    /// channel at its cap is skipped for the next usable one; over the overall cap, or with
    /// every channel capped, it is stored suppressed.
    func insert(person: String, idempotencyKey: String, requestHash: Data, nowMs: Int64,
                plan: @escaping @Sendable (_ person: Evidence, _ population: Evidence) -> RoutingV1.Delivery) async throws -> Inserted {
        let entry = Insert(person: person, idempotencyKey: idempotencyKey, requestHash: requestHash, nowMs: nowMs, plan: plan)
        return try await inserts.submit(entry) { [self] entries in
            try pool.write { db in try entries.map { try insert(db, $0) } }
        }
    }

    private func insert(_ db: Database, _ entry: Insert) throws -> Inserted {
        if let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT record, request_hash FROM delivery WHERE idempotency_key = ?"),
                                      arguments: [entry.idempotencyKey]) {
            return .existing(try Self.record(row[0]), sameRequest: (row[1] as Data) == entry.requestHash)
        }
        // A person this service's feed merged away (the profile service may not have applied
        // that merge yet): planned and stored for the survivor, with its evidence (opt-outs,
        // bounced addresses, caps), keeping the id it was routed for as its origin for an unmerge.
        var person = entry.person
        for _ in 0..<64 {
            guard let target = try String.fetchOne(db.cachedStatement(sql: "SELECT target FROM person_merged WHERE person_id = ?"),
                                                   arguments: [person]) else { break }
            person = target
        }
        if try Bool.fetchOne(db.cachedStatement(sql: "SELECT EXISTS (SELECT 1 FROM person_erased WHERE person_id = ?)"), arguments: [person])! {
            return .personErased
        }
        var d = entry.plan(try Self.evidence(db, person: person), population.withLock { $0 })
        d.personId = person
        d.deliveryId = TimeOrderedID.make("dl", nowMs: entry.nowMs)
        if d.state == .scheduled && d.urgency == .normal { try applyCaps(db, &d) }
        try db.cachedStatement(sql: """
            INSERT INTO delivery (delivery_id, idempotency_key, request_hash, person_id, state, channel, send_at_ms, next_attempt_ms, record,
                                  origin_person_id)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """).execute(arguments: [d.deliveryId, d.idempotencyKey, entry.requestHash, d.personId, d.state.rawValue, d.channel.rawValue,
                                     d.sendAtMs, d.nextAttemptAtMs, Data(d.serializedBytes()), person == entry.person ? nil : entry.person])
        return .stored(d)
    }

    /// Caps hold over any 24 hours (7 days): the person's scheduled and sent deliveries in
    /// the busiest window of that length that contains the planned send time, this one
    /// included, may not go over.
    private func applyCaps(_ db: Database, _ d: inout RoutingV1.Delivery) throws {
        let day: Int64 = 86_400_000, week = 7 * day, t = d.sendAtMs
        let rows = try Row.fetchAll(db.cachedStatement(sql: """
            SELECT channel, send_at_ms FROM delivery WHERE person_id = ? AND send_at_ms > ? AND send_at_ms < ? AND state IN (1, 3)
            """), arguments: [d.personId, t - week, t + week])
        let others = rows.map { (channel: $0[0] as Int32, at: $0[1] as Int64) }.sorted { $0.at < $1.at }
        let times = others.map(\.at)
        let dayTotal = Self.busiestWindow(sorted: times, around: t, length: day)
        let weekTotal = Self.busiestWindow(sorted: times, around: t, length: week)
        let c = configuration
        func suppress(_ detail: String) {
            d.state = .suppressed
            d.suppressionReason = "capped"
            d.suppressionDetail = detail
            d.channel = .unspecified
            d.address = ""
            d.fallbackChannels = []
            d.sendAtMs = 0
            d.nextAttemptAtMs = 0
            d.sendTimeReason = ""
        }
        if dayTotal >= c.capPerDay { return suppress("\(dayTotal) deliveries within 24 hours (cap \(c.capPerDay))") }
        if weekTotal >= c.capPerWeek { return suppress("\(weekTotal) deliveries within 7 days (cap \(c.capPerWeek))") }
        var chosen: [CommonV1.Channel] = []
        for i in d.channels.indices where d.channels[i].excluded.isEmpty {
            let channel = d.channels[i].channel
            let mine = others.filter { $0.channel == channel.rawValue }.map(\.at)  // sorted, as `others`
            let perDay = Self.busiestWindow(sorted: mine, around: t, length: day)
            let perWeek = Self.busiestWindow(sorted: mine, around: t, length: week)
            if perDay >= c.capPerChannelPerDay || perWeek >= c.capPerChannelPerWeek {
                d.channels[i].excluded = "capped"
                d.channels[i].detail = "\(perDay) within 24 hours (cap \(c.capPerChannelPerDay)), \(perWeek) within 7 days (cap \(c.capPerChannelPerWeek))"
            } else {
                chosen.append(channel)
            }
        }
        guard let first = chosen.first else { return suppress("every usable channel is at its cap") }
        d.channel = first
        d.address = d.channels.first { $0.channel == first }!.address
        d.fallbackChannels = Array(chosen.dropFirst())
    }

    /// The most of `times` in one window `length` long that also holds `t` (windows
    /// [s, s + length) with t - length < s <= t).
    static func busiestWindow(_ times: [Int64], around t: Int64, length: Int64) -> Int {
        busiestWindow(sorted: times.sorted(), around: t, length: length)
    }

    /// `busiestWindow` of times in ascending order, in one pass over those near `t` (it
    /// counted every window anew: O(n²) for a person with n contacts in the week, under the
    /// store's writer, and n is as large as critical Routes make it).
    static func busiestWindow(sorted times: [Int64], around t: Int64, length: Int64) -> Int {
        // The times near t: (t - length, t + length).
        let first = firstIndex(times) { $0 > t - length }
        let end = firstIndex(times) { $0 >= t + length }
        var best = 0, lo = first, hi = first
        // The busiest such window starts at one of the times, or at t itself: in ascending order.
        func window(from start: Int64) {
            while lo < end && times[lo] < start { lo += 1 }
            hi = max(hi, lo)
            while hi < end && times[hi] < start + length { hi += 1 }
            best = max(best, hi - lo)
        }
        var i = first
        while i < end && times[i] <= t {
            window(from: times[i])
            i += 1
        }
        window(from: t)
        return best
    }

    /// The first index of ascending `times` at which `holds` (false, then true) is true.
    static func firstIndex(_ times: [Int64], where holds: (Int64) -> Bool) -> Int {
        var (low, high) = (0, times.count)
        while low < high {
            let middle = (low + high) / 2
            if holds(times[middle]) { high = middle } else { low = middle + 1 }
        }
        return low
    }

    /// A cap over a day and a week on contacts at `times` (all of a person's, or one channel's).
    typealias CapLimit = (times: [Int64], perDay: Int, perWeek: Int)

    /// The first time in (`after`, `until`] at which a send would keep every one of `limits`
    /// (`busiestWindow` under `perDay` and `perWeek`): one of the moments an earlier contact
    /// leaves a window. Nil when there is none.
    static func firstWithinCaps(_ limits: [CapLimit], after: Int64, until: Int64) -> Int64? {
        let day: Int64 = 86_400_000, week = 7 * day
        let sorted = limits.map { (times: $0.times.sorted(), perDay: $0.perDay, perWeek: $0.perWeek) }
        let moments = Set(limits.flatMap { $0.times.flatMap { [$0 + day, $0 + week] } }).filter { $0 > after && $0 <= until }.sorted()
        return moments.first { t in
            sorted.allSatisfy {
                busiestWindow(sorted: $0.times, around: t, length: day) < $0.perDay
                    && busiestWindow(sorted: $0.times, around: t, length: week) < $0.perWeek
            }
        }
    }

    // MARK: - Judged again at send time

    /// What the dispatcher may do with a due delivery now.
    enum SendCheck: Equatable {
        case send
        /// Not before `atMs` (quiet hours, for a message that is not critical; consent that
        /// could not be read again).
        case later(atMs: Int64, why: String)
        /// Not on this channel: an unsubscribe or complaint, or a hard bounce of its address,
        /// recorded since the delivery was planned, or the profile's consent withdrawn
        /// (`reason` as a suppression reason).
        case refused(reason: String, why: String)
        /// Not at all: `not_after` has passed.
        case expired(why: String)
        /// Not at all: sent now, it would go over the person's overall caps (a message sent
        /// later than planned: retried, held by an outage or quiet hours, requeued), and no
        /// later moment before its `not_after` (if it has one) keeps them.
        case capped(why: String)
    }

    /// The person's consent as the profile service answered just before a send
    /// (`RoutingConfiguration.consentRecheckAfterMs`).
    public enum SendTimeConsent: Sendable, Equatable {
        /// Not read again: the plan is recent, or there is no profile service.
        case notRead
        /// The profile's consent records now, and its traits (nil: not read), from which the
        /// delivery's address is taken again.
        case read([ProfileV1.ConsentRecord], traits: [String: RuleValue]? = nil)
        /// The profile service no longer knows the person (erased): no consent is left.
        case personUnknown(String)
        /// The profile service did not answer: the delivery waits, consent is never guessed.
        case unreadable(String)
    }

    /// Judges `d` on its current channel at `nowMs` with what this store has learned since it
    /// was planned, and with the profile's consent when it was read again (`consent`).
    /// Opt-outs older than the plan were weighed by the planner against the consent it read,
    /// so only newer ones refuse here.
    func check(_ d: RoutingV1.Delivery, _ evidence: Evidence, consent: SendTimeConsent = .notRead, moved: Bool = false, nowMs: Int64) -> SendCheck {
        if d.notAfterMs > 0 && nowMs > d.notAfterMs {
            return .expired(why: "not_after \(d.notAfterMs) passed before it could be sent (now \(nowMs))")
        }
        switch consent {
        case .notRead: break
        case .read(let records, _):
            if let refusal = Planner.profileConsentRefusal(d.channel, purpose: d.purpose, consent: records) {
                return .refused(reason: "no_consent", why: "\(refusal) (read again before sending)")
            }
        case .personUnknown(let why):
            return .refused(reason: "no_consent", why: "the profile service no longer knows the person (\(why))")
        case .unreadable(let why):
            // Waits as long again as it has waited since it was due (initialBackoffMs at
            // least, maxBackoffMs at most): a long outage costs each delivery a few tries.
            let waited = nowMs - max(d.sendAtMs, d.createdAtMs)
            let at = nowMs + min(Int64(configuration.maxBackoffMs), max(Int64(configuration.initialBackoffMs), waited))
            if d.notAfterMs > 0 && at > d.notAfterMs {
                guard nowMs < d.notAfterMs else {
                    return .expired(why: "consent could not be read again before not_after \(d.notAfterMs) (\(why))")
                }
                return .later(atMs: d.notAfterMs, why: "consent cannot be read again: \(why)")
            }
            return .later(atMs: at, why: "consent cannot be read again: \(why)")
        }
        // With the consent read again, an opt-out older than the grant that governs now (a
        // merge brings the other person's opt-outs as learned now) does not refuse, as the
        // planner would not have refused it.
        var grantedAt = Int64.min
        if case .read(let records, _) = consent, let record = Planner.governing(d.channel, purpose: d.purpose, consent: records) {
            grantedAt = record.atMs
        }
        if let optOut = evidence.optOuts.first(where: {
            $0.purpose == d.purpose && ($0.channel == d.channel.rawValue || $0.channel == 0) && $0.recordedAtMs >= d.createdAtMs
                && $0.atMs >= grantedAt
        }) {
            return .refused(reason: "no_consent", why: "unsubscribed or complained at \(optOut.atMs), learned after it was planned")
        }
        var address = d.address
        switch addressNow(d, consent: consent) {
        case nil: break
        case .success(let now)?: address = now
        case .failure(let why)?: return .refused(reason: "unreachable", why: "\(why) (read again before sending)")
        }
        if evidence.unreachable.contains(Evidence.unreachableKey(d.channel, address)) {
            return .refused(reason: "unreachable", why: "\(address) hard-bounced since it was planned")
        }
        if d.urgency != .critical {
            let clock = LocalClock(TimeZone(identifier: d.timeZone) ?? TimeZone(identifier: "UTC")!)
            let at = clock.leavingQuietHours(nowMs, configuration.quietHours)
            if at != nowMs {
                if d.notAfterMs > 0 && at > d.notAfterMs {
                    return .expired(why: "quiet hours (\(clock.zone.identifier)) last past not_after \(d.notAfterMs)")
                }
                return .later(atMs: at, why: "quiet hours (\(clock.zone.identifier))")
            }
            // The caps, again, for a message sent more than `lateAfterMs` after its planned time
            // (held by an outage or quiet hours, retried for long, requeued): planned within
            // them, it may meet other contacts where it goes now. It is checked as when
            // planning, at now: against the sends before it and the deliveries scheduled after
            // it, in the busiest window holding it. One on time was checked where it goes, when
            // it was planned.
            guard Self.rechecksCaps(d, nowMs, moved: moved) else { return .send }
            let c = configuration
            let day: Int64 = 86_400_000, week = 7 * day
            let contacts = evidence.contacts.sorted { $0.atMs < $1.atMs }
            let times = contacts.map(\.atMs)
            // A message that may still go later waits for the first moment, a minute before its
            // not_after at the latest (a send is never exactly on time), at which an earlier
            // contact has left the window and `limits` hold.
            func wait(_ why: String, _ limits: [CapLimit]) -> SendCheck? {
                guard d.notAfterMs > 0, let at = Self.firstWithinCaps(limits, after: nowMs, until: d.notAfterMs - 60_000) else { return nil }
                return .later(atMs: at, why: "\(why); within the caps at \(at)")
            }
            let dayTotal = Self.busiestWindow(sorted: times, around: nowMs, length: day)
            let weekTotal = Self.busiestWindow(sorted: times, around: nowMs, length: week)
            if dayTotal >= c.capPerDay || weekTotal >= c.capPerWeek {
                let why = dayTotal >= c.capPerDay ? "sent now, \(dayTotal + 1) deliveries within 24 hours (cap \(c.capPerDay))"
                    : "sent now, \(weekTotal + 1) deliveries within 7 days (cap \(c.capPerWeek))"
                return wait(why, [(times, c.capPerDay, c.capPerWeek)]) ?? .capped(why: why)
            }
            let mine = contacts.filter { $0.channel == d.channel.rawValue }.map(\.atMs)  // sorted, as `contacts`
            let perDay = Self.busiestWindow(sorted: mine, around: nowMs, length: day)
            let perWeek = Self.busiestWindow(sorted: mine, around: nowMs, length: week)
            if perDay >= c.capPerChannelPerDay || perWeek >= c.capPerChannelPerWeek {
                let why = "sent now, \(perDay + 1) within 24 hours (cap \(c.capPerChannelPerDay)), \(perWeek + 1) within 7 days (cap \(c.capPerChannelPerWeek))"
                // On its last channel it waits for this channel's caps and the overall ones (with
                // a fallback left, it falls back now).
                let later = d.fallbackChannels.isEmpty
                    ? wait(why, [(times, c.capPerDay, c.capPerWeek), (mine, c.capPerChannelPerDay, c.capPerChannelPerWeek)]) : nil
                return later ?? .refused(reason: "capped", why: why)
            }
        }
        return .send
    }

    /// `d`'s address on its channel from the profile's traits read again before sending (the
    /// person may have changed it, or it may no longer be verified), or nil when they were not.
    func addressNow(_ d: RoutingV1.Delivery, consent: SendTimeConsent) -> Result<String, Planner.AddressError>? {
        guard case .read(_, let traits?) = consent else { return nil }
        return Planner.address(d.channel, traits: traits, personID: d.personId, configuration: configuration)
    }

    /// Called by the dispatcher just before it sends `planned`: the delivery to send now (it
    /// may have moved to a fallback channel), or nil when it is not to be sent now. An
    /// unsubscribe, a complaint or a hard bounce recorded since it was planned, or a consent
    /// the profile service no longer grants (`consent`, when read again), moves it along
    /// its channel chain, or suppresses it when none is left; past `not_after` it is
    /// suppressed ("expired"); in quiet hours (a retry, a fallback, a requeued dead letter, an
    /// outage) it waits for their end. Most deliveries pass on one read.
    func beforeSending(_ planned: RoutingV1.Delivery, consent: SendTimeConsent = .notRead, nowMs: Int64) throws -> RoutingV1.Delivery? {
        // The delivery as stored now, too: one erased (with its person), requeued or moved
        // since the dispatcher read it is not sent from the dispatcher's copy.
        let read = try pool.read { db -> (evidence: Evidence, still: Bool, moved: Bool) in
            let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT state, channel, origin_person_id FROM delivery WHERE delivery_id = ?"),
                                       arguments: [planned.deliveryId])
            let still = row.map { $0["state"] as Int == RoutingV1.Delivery.State.scheduled.rawValue && $0["channel"] as Int == planned.channel.rawValue } ?? false
            // A merge moved it, or merged another person's contacts into its person's (it has an
            // origin): planned without some of the contacts it goes among.
            let moved = row.map { ($0["origin_person_id"] as String?) != nil } ?? false
            return (try Self.evidence(db, person: planned.personId, engagement: false,
                                      contactsAround: Self.rechecksCaps(planned, nowMs, moved: moved) ? nowMs : nil,
                                      contactsThrough: planned.notAfterMs), still, moved)
        }
        guard read.still else { return nil }
        // Sent as planned, unless the address read again differs (then it is saved first).
        let address = (try? addressNow(planned, consent: consent)?.get()) ?? planned.address
        if address == planned.address && check(planned, read.evidence, consent: consent, moved: read.moved, nowMs: nowMs) == .send { return planned }
        return try pool.write { db in
            guard var d = try Self.load(db, planned.deliveryId), d.state == .scheduled, d.channel == planned.channel,
                  d.nextAttemptAtMs <= nowMs else { return nil }
            // With the contacts of a normal message: it may fall back below, and a fallback's caps are checked.
            let evidence = try Self.evidence(db, person: d.personId, engagement: false, contactsAround: d.urgency != .critical ? nowMs : nil,
                                             contactsThrough: d.notAfterMs)
            while true {
                // The address on its channel (a fallback's too) as the profile says now.
                if let now = try? addressNow(d, consent: consent)?.get(), now != d.address {
                    d.address = now
                    if let i = d.channels.firstIndex(where: { $0.channel == d.channel }) { d.channels[i].address = now }
                }
                switch check(d, evidence, consent: consent, moved: read.moved, nowMs: nowMs) {
                case .send:
                    try save(db, d)
                    return d
                case .later(let at, _):
                    d.nextAttemptAtMs = at
                    try save(db, d)
                    return nil
                case .expired(let why):
                    Self.suppress(&d, reason: "expired", why: why, atMs: nowMs)
                    try save(db, d)
                    return nil
                case .capped(let why):
                    Self.suppress(&d, reason: "capped", why: why, atMs: nowMs)
                    try save(db, d)
                    return nil
                case .refused(let reason, let why):
                    guard !d.fallbackChannels.isEmpty else {
                        Self.suppress(&d, reason: reason, why: "\(d.channel.ruleName): \(why)", atMs: nowMs)
                        try save(db, d)
                        return nil
                    }
                    Self.fallBack(&d, atMs: nowMs, why: "\(d.channel.ruleName): \(why)")
                }
            }
        }
    }

    /// Stops a scheduled delivery for good, with the event that says why.
    static func suppress(_ d: inout RoutingV1.Delivery, reason: String, why: String, atMs: Int64) {
        var e = RoutingV1.DeliveryEvent()
        e.kind = .suppressed
        e.atMs = atMs
        e.channel = d.channel
        e.detail = why
        d.events.append(e)
        d.state = .suppressed
        d.suppressionReason = reason
        d.suppressionDetail = why
        d.fallbackChannels = []
    }

    // MARK: - Dispatch results

    enum SendResult: Sendable, Equatable {
        case sent
        /// Worth retrying (timeouts, 5xx, 429, SMTP 4xx); `retryAfterMs`: the wait the
        /// endpoint asked for (`Retry-After`), if any.
        case transient(String, retryAfterMs: Int64? = nil)
        /// Not worth retrying on this channel (other 4xx, SMTP 5xx, a revoked consent).
        case permanent(String)

        var isTransient: Bool {
            if case .transient = self { return true }
            return false
        }
    }

    struct Update: Sendable {
        var deliveryID: String
        var channel: CommonV1.Channel
        var result: SendResult
        var atMs: Int64
        var backoffMs: Int64
        /// False for a probe's transient failure (`CircuitBreakers`): the delivery keeps its attempts.
        var counted = true
    }

    /// Records an attempt's result: sent; or a retry after `backoffMs`; or, after the last
    /// attempt or a permanent failure, the next channel of the chain, else a dead letter.
    /// Nil when the delivery is gone (erased) or no longer scheduled on that channel.
    func record(_ update: Update) async throws -> RoutingV1.Delivery? {
        try await updates.submit(update) { [self] entries in
            try pool.write { db in try entries.map { try record(db, $0) } }
        }
    }

    private func record(_ db: Database, _ u: Update) throws -> RoutingV1.Delivery? {
        guard var d = try Self.load(db, u.deliveryID), d.state == .scheduled, d.channel == u.channel else { return nil }
        func event(_ kind: RoutingV1.DeliveryEventKind, _ detail: String = "") {
            var e = RoutingV1.DeliveryEvent()
            e.kind = kind
            e.atMs = u.atMs
            e.channel = d.channel
            e.detail = detail
            d.events.append(e)
        }
        switch u.result {
        case .sent:
            d.state = .sent
            d.sentAtMs = u.atMs
            d.attempts += 1
            d.lastError = ""
            event(.sent, d.address)
            try addEngagement(db, person: d.personId, keys: [EngagementKey.channel(d.channel)], sends: 1, engaged: 0, atMs: u.atMs)
            // A hard bounce of this address reported while the send was under way (a receiver
            // that reports before it answers): the check before the send had not seen it, and
            // the report found the delivery not yet sent, so the fallback is taken now.
            let bounced = try Bool.fetchOne(db.cachedStatement(sql: "SELECT 1 FROM unreachable WHERE person_id = ? AND channel = ? AND address = ?"),
                                            arguments: [d.personId, d.channel.rawValue, d.address]) ?? false
            if bounced && !d.fallbackChannels.isEmpty {
                Self.fallBack(&d, atMs: u.atMs, why: "hard bounce on \(d.channel.ruleName) \(d.address), reported during the send")
            }
        case .transient(let error, _), .permanent(let error):
            if u.counted { d.attempts += 1 }
            d.lastError = error
            event(.attemptFailed, u.counted ? error : "\(error) (a probe while the circuit was open: not counted as an attempt)")
            if case .transient = u.result, !u.counted || Int(d.attempts) < configuration.maxAttempts {
                d.nextAttemptAtMs = u.atMs + u.backoffMs
            } else {
                Self.fallBack(&d, atMs: u.atMs, why: "\(d.attempts) attempt(s) on \(d.channel.ruleName) failed: \(error)")
            }
        }
        try save(db, d)
        return d
    }

    /// The key a receiver deduplicates a send by: the client's idempotency key and the
    /// channel, `<key>:<channel>`. A retry on one channel repeats it; a fallback to another
    /// channel, often posted to the same webhook, has a key of its own (with the client's
    /// key alone, a receiver that drops repeated keys dropped every fallback).
    static func sendKey(_ d: RoutingV1.Delivery) -> String { "\(d.idempotencyKey):\(d.channel.ruleName)" }

    /// Moves a delivery to the next channel of its chain, or dead-letters it.
    static func fallBack(_ d: inout RoutingV1.Delivery, atMs: Int64, why: String) {
        var e = RoutingV1.DeliveryEvent()
        e.atMs = atMs
        e.channel = d.channel
        e.detail = why
        if let next = d.fallbackChannels.first {
            e.kind = .fellBack
            d.fallbackChannels.removeFirst()
            d.channel = next
            d.address = d.channels.first { $0.channel == next }?.address ?? ""
            d.attempts = 0
            d.state = .scheduled
            d.nextAttemptAtMs = atMs
        } else {
            e.kind = .deadLettered
            d.state = .deadLetter
        }
        d.events.append(e)
    }

    /// A send this long after its planned time is late: the caps are checked again before it,
    /// and count it when it went (5 minutes).
    static let lateAfterMs: Int64 = 300_000

    /// A normal message going now more than `lateAfterMs` after its planned time: the caps
    /// are checked again (only then are the person's contacts read for it).
    static func isLate(_ d: RoutingV1.Delivery, _ nowMs: Int64) -> Bool {
        d.urgency != .critical && nowMs > d.sendAtMs + lateAfterMs
    }

    /// Whether the caps are checked again before `d` goes: late, on a fallback channel
    /// (planned, it counted only against its first channel's caps), or `moved` to its person
    /// by a merge (planned against another person's contacts).
    static func rechecksCaps(_ d: RoutingV1.Delivery, _ nowMs: Int64, moved: Bool = false) -> Bool {
        isLate(d, nowMs) || (d.urgency != .critical && (moved || d.events.contains { $0.kind == .fellBack }))
    }

    /// Writes `d` back. A delivery sent late has `send_at_ms` set to when it was sent: the
    /// caps count it there. One sent on time keeps its planned instant (a best hour is on the
    /// hour: daily messages planned exactly a day apart must stay so).
    func save(_ db: Database, _ d: RoutingV1.Delivery) throws {
        let countedAt = d.state == .sent && d.sentAtMs > d.sendAtMs + Self.lateAfterMs ? d.sentAtMs : d.sendAtMs
        try db.execute(sql: "UPDATE delivery SET state = ?, channel = ?, next_attempt_ms = ?, person_id = ?, send_at_ms = ?, record = ? WHERE delivery_id = ?",
                       arguments: [d.state.rawValue, d.channel.rawValue, d.nextAttemptAtMs, d.personId,
                                   countedAt, Data(d.serializedBytes()), d.deliveryId])
    }

    /// Adds decayed evidence for the person and the population.
    func addEngagement(_ db: Database, person: String, keys: [Int], sends: Double, engaged: Double, atMs: Int64) throws {
        let halfLife = configuration.halfLifeMs
        for who in [person, ""] {
            for key in keys {
                let old = try Row.fetchOne(db.cachedStatement(sql: "SELECT sends, engaged, updated_ms FROM engagement WHERE person_id = ? AND key = ?"),
                                           arguments: [who, key]).map { Engagement(sends: $0[0], engaged: $0[1], updatedMs: $0[2]) } ?? Engagement()
                var new = old.decayed(to: atMs, halfLifeMs: halfLife)
                new.sends += sends
                new.engaged += engaged
                new.updatedMs = max(new.updatedMs, atMs)
                try db.execute(sql: "INSERT OR REPLACE INTO engagement (person_id, key, sends, engaged, updated_ms) VALUES (?, ?, ?, ?, ?)",
                               arguments: [who, key, new.sends, new.engaged, new.updatedMs])
                if who.isEmpty { population.withLock { $0.engagement[key] = new } }
            }
        }
    }

    // MARK: - Reported events

    struct OptOut: Sendable, Equatable {
        var person: String
        var purpose: String
        var channel: CommonV1.Channel
        var atMs: Int64
        var source: String
    }

    /// The key a reported event counts once by, per delivery and channel: its kind, and for a
    /// hard bounce a key of its own (one after a soft bounce still marks the address).
    static func eventKey(_ kind: RoutingV1.DeliveryEventKind, hardBounce: Bool) -> Int32 {
        kind == .bounced && hardBounce ? 100 + kind.rawValue : kind.rawValue
    }

    /// Records a reported event once per delivery, channel and kind. Opens and clicks teach channel
    /// preference and the person's hours; a hard bounce marks the address unreachable (and
    /// sends the delivery on to its next channel, if any); an unsubscribe or a complaint
    /// records an opt-out here at once and returns it for the profile service.
    /// `atMs` is when it happened (the reporter's time), `nowMs` when it is recorded here.
    /// An event concerns the channel and address the delivery was last sent on (a fallback
    /// may have moved it on since: a bounce reported again must not count against the next).
    func report(_ id: String, kind: RoutingV1.DeliveryEventKind, hardBounce: Bool, channel reported: CommonV1.Channel? = nil,
                atMs: Int64, nowMs: Int64) throws -> (RoutingV1.Delivery, OptOut?)? {
        try pool.write { db in
            guard var d = try Self.load(db, id) else { return nil }
            // A suppressed delivery was never sent: nothing to open, bounce or unsubscribe from
            // (one suppressed when planned has no channel, and an unsubscribe there read as one
            // from every channel). A scheduled one may be in flight: a receiver can report
            // before the send is recorded.
            guard d.state != .suppressed || d.events.contains(where: { $0.kind == .sent }) else {
                throw RPCError(.failedPrecondition, "delivery_id: delivery \(id) was suppressed, never sent")
            }
            // The send the event is about: on the channel named, else the last.
            let sent = d.events.last { $0.kind == .sent && (reported == nil || $0.channel == reported) }
            if let reported, sent == nil {
                throw RPCError.invalidArgument(field: "channel", "delivery \(id) was not sent on \(reported.ruleName)")
            }
            let channel = sent?.channel ?? d.channel, address = sent?.detail ?? d.address
            try db.execute(sql: "INSERT OR IGNORE INTO delivery_event (delivery_id, channel, kind, at_ms) VALUES (?, ?, ?, ?)",
                           arguments: [id, channel.rawValue, Self.eventKey(kind, hardBounce: hardBounce), atMs])
            guard db.changesCount > 0 else { return (d, nil) }
            var e = RoutingV1.DeliveryEvent()
            e.kind = kind
            e.atMs = atMs
            e.channel = channel
            e.detail = kind == .bounced ? (hardBounce ? "hard" : "soft") : ""
            let engagedBefore = d.events.contains { $0.kind == .opened || $0.kind == .clicked }
            d.events.append(e)
            var optOut: OptOut?
            switch kind {
            case .opened, .clicked:
                if !engagedBefore {
                    let zone = TimeZone(identifier: d.timeZone) ?? TimeZone(identifier: "UTC")!
                    let hour = LocalClock(zone).hour(atMs)
                    try addEngagement(db, person: d.personId, keys: [EngagementKey.channel(channel), EngagementKey.hour(hour)],
                                      sends: 0, engaged: 1, atMs: atMs)
                }
            case .bounced where hardBounce:
                // A delivery a merge moved here bounced on its own person's address.
                let origin = try String.fetchOne(db, sql: "SELECT origin_person_id FROM delivery WHERE delivery_id = ?", arguments: [id])
                try Self.markUnreachable(db, person: d.personId, channel: channel, address: address, atMs: atMs,
                                         origin: origin == d.personId ? "" : origin ?? "")
                if d.state == .sent && d.channel == channel && !d.fallbackChannels.isEmpty {
                    Self.fallBack(&d, atMs: atMs, why: "hard bounce on \(channel.ruleName) \(address)")
                    // Sent by this service's clock, not the reporter's (which may run a day ahead).
                    d.nextAttemptAtMs = nowMs
                }
            case .complained, .unsubscribed:
                let source = kind == .complained ? "routing:complaint" : "routing:unsubscribe"
                // One older than the person's latest opt-out there (a late report) changes nothing.
                if try Self.recordOptOut(db, person: d.personId, purpose: d.purpose, channel: channel, atMs: atMs, source: source, nowMs: nowMs) {
                    optOut = OptOut(person: d.personId, purpose: d.purpose, channel: channel, atMs: atMs, source: source)
                }
            default:
                break
            }
            try save(db, d)
            return (d, optOut)
        }
    }

    /// Records an opt-out, to be passed on to the profile service, unless the person's opt-out
    /// on that purpose and channel is as new or newer (a late report must not replace, nor
    /// mark as passed on, a newer one). Whether it was recorded.
    @discardableResult
    static func recordOptOut(_ db: Database, person: String, purpose: String, channel: CommonV1.Channel, atMs: Int64,
                             source: String, nowMs: Int64) throws -> Bool {
        try db.execute(sql: """
            INSERT INTO opt_out (person_id, purpose, channel, at_ms, source, synced, recorded_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6)
            ON CONFLICT (person_id, purpose, channel) DO UPDATE SET at_ms = excluded.at_ms, source = excluded.source,
              synced = 0, recorded_at_ms = excluded.recorded_at_ms WHERE excluded.at_ms > opt_out.at_ms
            """, arguments: [person, purpose, channel.rawValue, atMs, source, nowMs])
        return db.changesCount > 0
    }

    /// Opt-outs the profile service has not yet confirmed, oldest first.
    func unsyncedOptOuts(limit: Int) throws -> [OptOut] {
        try pool.read { db in
            try Row.fetchAll(db, sql: "SELECT person_id, purpose, channel, at_ms, source FROM opt_out WHERE synced = 0 ORDER BY at_ms LIMIT ?",
                             arguments: [limit]).map { OptOut(person: $0[0], purpose: $0[1], channel: CommonV1.Channel(rawValue: $0[2]), atMs: $0[3], source: $0[4]) }
        }
    }

    func markSynced(_ optOut: OptOut) throws {
        try pool.write { db in
            try db.execute(sql: "UPDATE opt_out SET synced = 1 WHERE person_id = ? AND purpose = ? AND channel = ? AND at_ms = ?",
                           arguments: [optOut.person, optOut.purpose, optOut.channel.rawValue, optOut.atMs])
        }
    }

    /// Puts a dead letter back in the outbox on its last channel, attempts reset.
    func requeue(_ id: String, atMs: Int64) throws -> RoutingV1.Delivery? {
        try pool.write { db in
            guard var d = try Self.load(db, id) else { return nil }
            guard d.state == .deadLetter else { return d }
            d.state = .scheduled
            d.attempts = 0
            d.nextAttemptAtMs = atMs
            var e = RoutingV1.DeliveryEvent()
            e.kind = .requeued
            e.atMs = atMs
            e.channel = d.channel
            d.events.append(e)
            try save(db, d)
            return d
        }
    }
}

// MARK: - The identity change feed

extension RoutingStore: IdentityChangeSink {
    public func identityCursor() throws -> Int64 {
        try pool.read { db in try Int64.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'identity_seq'") ?? 0 }
    }

    /// Merges move deliveries, engagement (summed), bounced addresses and opt-outs to the
    /// surviving person; each moved delivery and bounced address keeps the person it was
    /// routed for. An unmerge gives the split person back its deliveries and bounced
    /// addresses and those of the persons it had absorbed, with the opt-outs their
    /// deliveries' events record; engagement and opt-outs carry no origin and also stay with
    /// the survivor. Erasures delete the persons' deliveries and bounced addresses wherever a
    /// merge moved them, and everything else of theirs.
    public func apply(_ changes: [(seq: Int64, change: IdentityChange)], nowMs: Int64) throws {
        guard !changes.isEmpty else { return }
        var erased = false
        try pool.write { db in
            let cursor = try Int64.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'identity_seq'") ?? 0
            for (seq, change) in changes where seq > cursor {
                switch change {
                case .merge(let target, let sources):
                    for source in sources where source != target { try merge(db, source, into: target, nowMs: nowMs) }
                case .erase(let person, let absorbed):
                    for p in [person] + absorbed where !p.isEmpty {
                        try Self.erase(db, p)
                        try db.execute(sql: "INSERT OR IGNORE INTO person_erased (person_id) VALUES (?)", arguments: [p])
                    }
                    erased = true
                case .unmerge(_, let split):
                    try unmerge(db, split, nowMs: nowMs)
                case .other:
                    break
                }
            }
            try db.execute(sql: "INSERT OR REPLACE INTO meta (key, value) VALUES ('identity_seq', ?)",
                           arguments: [max(cursor, changes.map(\.seq).max()!)])
        }
        if erased {
            truncation.owe()
            // Up to 1 s for the readers to move on (every write waits for the writer
            // meanwhile); failing that, `truncationRetrier` tries again.
            try? truncation.pay(pool, patience: .seconds(1))
        }
    }

    private func merge(_ db: Database, _ source: String, into target: String, nowMs: Int64) throws {
        try db.execute(sql: "UPDATE delivery SET origin_person_id = person_id WHERE person_id = ? AND origin_person_id IS NULL",
                       arguments: [source])
        // The survivor's own scheduled deliveries were planned without the source's contacts:
        // with an origin (their own person), they are checked against the caps again at send
        // time, as the moved ones are (`rechecksCaps`).
        try db.execute(sql: "UPDATE delivery SET origin_person_id = person_id WHERE person_id = ? AND origin_person_id IS NULL AND state = ?",
                       arguments: [target, RoutingV1.Delivery.State.scheduled.rawValue])
        try move(db, "person_id = ?", [source], to: target)
        try db.execute(sql: "INSERT OR REPLACE INTO person_merged (person_id, target) VALUES (?, ?)", arguments: [source, target])
        let halfLife = configuration.halfLifeMs
        let mine = try Self.evidence(db, person: source).engagement
        let theirs = try Self.evidence(db, person: target).engagement
        for (key, e) in mine {
            let sum = e.decayed(to: nowMs, halfLifeMs: halfLife) + (theirs[key] ?? Engagement()).decayed(to: nowMs, halfLifeMs: halfLife)
            try db.execute(sql: "INSERT OR REPLACE INTO engagement (person_id, key, sends, engaged, updated_ms) VALUES (?, ?, ?, ?, ?)",
                           arguments: [target, key, sum.sends, sum.engaged, nowMs])
        }
        try moveUnreachable(db, "person_id = ?1", [source], to: target, ownedBy: source)
        // Both persons opted out of the same purpose and channel: the newer record stays, unsynced
        // when it is (it must still reach the profile service).
        // The survivor's deliveries were planned without the source's opt-outs: they count as
        // learned now.
        try db.execute(sql: """
            INSERT INTO opt_out (person_id, purpose, channel, at_ms, source, synced, recorded_at_ms)
              SELECT ?1, purpose, channel, at_ms, source, synced, ?3 FROM opt_out WHERE person_id = ?2 AND true
            ON CONFLICT (person_id, purpose, channel) DO UPDATE SET at_ms = excluded.at_ms, source = excluded.source,
              synced = excluded.synced, recorded_at_ms = excluded.recorded_at_ms WHERE excluded.at_ms > opt_out.at_ms
            """, arguments: [target, source, nowMs])
        for table in ["engagement", "unreachable", "opt_out"] {
            try db.execute(sql: "DELETE FROM \(table) WHERE person_id = ?", arguments: [source])
        }
    }

    /// Gives `split` back the deliveries routed for it or for a person it had absorbed (it
    /// comes back with them, as the identity service gives their identifiers back), wherever
    /// merges moved them.
    ///
    /// Its bounced addresses go back with them. Opt-outs carry no origin: those the events of
    /// the deliveries it gets back record (an unsubscribe or complaint from it; and a hard
    /// bounce, for a bounce recorded before v7 kept whose it was) are recorded for it again,
    /// learned now, so that none of those deliveries goes against an unsubscribe while it was
    /// merged; the survivor keeps them too.
    private func unmerge(_ db: Database, _ split: String, nowMs: Int64) throws {
        let absorbed = try String.fetchAll(db, sql: """
            WITH RECURSIVE absorbed(person_id) AS (
              SELECT person_id FROM person_merged WHERE target = ?1
              UNION SELECT m.person_id FROM person_merged m JOIN absorbed a ON m.target = a.person_id)
            SELECT person_id FROM absorbed
            """, arguments: [split])
        try db.execute(sql: "DELETE FROM person_merged WHERE person_id = ?", arguments: [split])
        for origin in [split] + absorbed {
            // The partial index's condition named, so that it is used.
            try moveUnreachable(db, "origin_person_id = ?1 AND origin_person_id <> '' AND person_id <> ?2", [origin, split], to: split, ownedBy: split)
            for d in try move(db, "origin_person_id = ?", [origin], to: split) {
                try Self.recordEvidence(db, of: d, origin: origin == split ? "" : origin, nowMs: nowMs)
            }
        }
        try db.execute(sql: "UPDATE delivery SET origin_person_id = NULL WHERE origin_person_id = ?1 AND person_id = ?1", arguments: [split])
    }

    /// Moves the bounced addresses `condition` selects (SQL over `unreachable`, with
    /// `arguments`) to `person`. Each keeps whose it was: `owner`'s own rows become the
    /// holder's own (''), another's name it (a merge's source names itself).
    private func moveUnreachable(_ db: Database, _ condition: String, _ arguments: [String], to person: String, ownedBy owner: String) throws {
        let n = arguments.count
        try db.execute(sql: """
            INSERT INTO unreachable (person_id, channel, address, at_ms, origin_person_id)
              SELECT ?\(n + 1), channel, address, at_ms,
                CASE origin_person_id WHEN ?\(n + 2) THEN '' WHEN '' THEN ?\(n + 2) ELSE origin_person_id END
              FROM unreachable WHERE \(condition) AND true
            ON CONFLICT (person_id, channel, address, origin_person_id) DO UPDATE SET at_ms = max(at_ms, excluded.at_ms)
            """, arguments: StatementArguments(arguments + [person, owner]))
        try db.execute(sql: "DELETE FROM unreachable WHERE \(condition)", arguments: StatementArguments(arguments))
    }

    /// Records `address` on `channel` as unreachable for `person`: its own (`origin` ''), or
    /// that of the person a merge moved here whose delivery bounced.
    static func markUnreachable(_ db: Database, person: String, channel: CommonV1.Channel, address: String, atMs: Int64, origin: String) throws {
        try db.execute(sql: """
            INSERT INTO unreachable (person_id, channel, address, at_ms, origin_person_id) VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (person_id, channel, address, origin_person_id) DO UPDATE SET at_ms = max(at_ms, excluded.at_ms)
            """, arguments: [person, channel.rawValue, address, atMs, origin])
    }

    /// Records for `d`'s person the hard bounces, unsubscribes and complaints that `d`'s
    /// events hold (as `report` did when they came), learned at `nowMs`; a bounce as `origin`'s
    /// (see `markUnreachable`). An opt-out goes to the profile service again (unsynced).
    static func recordEvidence(_ db: Database, of d: RoutingV1.Delivery, origin: String, nowMs: Int64) throws {
        var sentTo: [CommonV1.Channel: String] = [:]  // the address each channel was last sent to
        for e in d.events {
            switch e.kind {
            case .sent:
                sentTo[e.channel] = e.detail
            case .bounced where e.detail == "hard":
                try markUnreachable(db, person: d.personId, channel: e.channel, address: sentTo[e.channel] ?? d.address, atMs: e.atMs, origin: origin)
            case .complained, .unsubscribed:
                try recordOptOut(db, person: d.personId, purpose: d.purpose, channel: e.channel, atMs: e.atMs,
                                 source: e.kind == .complained ? "routing:complaint" : "routing:unsubscribe", nowMs: nowMs)
            default:
                break
            }
        }
    }

    /// The deliveries `condition` selects (SQL over `delivery`) now belong to `person`; returns them.
    @discardableResult
    private func move(_ db: Database, _ condition: String, _ arguments: StatementArguments, to person: String) throws -> [RoutingV1.Delivery] {
        try Data.fetchAll(db, sql: "SELECT record FROM delivery WHERE \(condition)", arguments: arguments).map { data in
            var d = try Self.record(data)
            d.personId = person
            try save(db, d)
            return d
        }
    }

    /// Keeps the outbox to `retentionDays` (`routing.outboxRetentionDays`): deletes the
    /// deliveries that are done (`pruneOutbox`), `batch` at a time, every `interval`.
    public func pruner(retentionDays: Int, interval: Duration = .seconds(60), batch: Int = 1000,
                       logger: Logger, clock: @escaping @Sendable () -> Int64) -> RetentionPruner {
        RetentionPruner("outbox", retentionDays: retentionDays, interval: interval, batch: batch, logger: logger, clock: clock) { [self] in
            try pruneOutbox(beforeMs: $0, limit: $1)
        }
    }

    /// Deletes up to `limit` deliveries that are done (sent, suppressed, dead letters), whose
    /// send time and last attempt are before `beforeMs`, with their events; returns how many
    /// went, and whether more may follow (`limit` rows were read). Scheduled ones stay,
    /// however old. Each call goes on from where the one before stopped (`pruneResume`), so
    /// that the rows kept are read once per round, not once per call.
    func pruneOutbox(beforeMs: Int64, limit: Int) throws -> (deleted: Int, more: Bool) {
        guard limit > 0 else { return (0, false) }
        // Delivery ids are minted when routed, never after the send time: the scan stops at
        // the first id minted after `beforeMs`. Read apart from the writer, which Route and the
        // dispatcher wait on; each row is checked again when deleted.
        let bound = TimeOrderedID.lowerBound("dl", atMs: beforeMs)
        let after = pruneResume.withLock { $0 }
        let ids = try pool.read { db in
            try String.fetchAll(db.cachedStatement(sql: """
                SELECT delivery_id FROM delivery WHERE delivery_id > ? AND delivery_id < ? AND state IN (3, 4, 5)
                  AND send_at_ms < ?3 AND next_attempt_ms < ?3 ORDER BY delivery_id LIMIT ?
                """), arguments: [after, bound, beforeMs, limit])
        }
        pruneResume.withLock { $0 = ids.count < limit ? "" : ids.last! }
        guard !ids.isEmpty else { return (0, false) }
        let deleted = try pool.write { db in
            let events = try db.cachedStatement(sql: "DELETE FROM delivery_event WHERE delivery_id = ?")
            let delivery = try db.cachedStatement(sql: """
                DELETE FROM delivery WHERE delivery_id = ? AND state IN (3, 4, 5) AND send_at_ms < ?2 AND next_attempt_ms < ?2
                """)
            var deleted = 0
            for id in ids {
                try delivery.execute(arguments: [id, beforeMs])
                guard db.changesCount > 0 else { continue }  // requeued or retried since it was read
                deleted += 1
                try events.execute(arguments: [id])
            }
            return deleted
        }
        return (deleted, ids.count == limit)
    }

    /// Deletes everything of `person`: its deliveries and bounced addresses (also those a
    /// merge moved to another person), their events, engagement and opt-outs.
    static func erase(_ db: Database, _ person: String) throws {
        guard !person.isEmpty else { return }
        try db.execute(sql: """
            DELETE FROM delivery_event WHERE delivery_id IN
              (SELECT delivery_id FROM delivery WHERE person_id = ?1 UNION SELECT delivery_id FROM delivery WHERE origin_person_id = ?1)
            """, arguments: [person])
        try db.execute(sql: "DELETE FROM delivery WHERE origin_person_id = ?", arguments: [person])
        try db.execute(sql: "DELETE FROM unreachable WHERE origin_person_id = ? AND origin_person_id <> ''", arguments: [person])
        for table in ["delivery", "engagement", "unreachable", "opt_out"] {
            try db.execute(sql: "DELETE FROM \(table) WHERE person_id = ?", arguments: [person])
        }
        // Only its own row: a person merged into it keeps its row until its own erasure, so
        // that it reads as erased meanwhile (an erasure's persons may come over several changes).
        try db.execute(sql: "DELETE FROM person_merged WHERE person_id = ?", arguments: [person])
    }
}
