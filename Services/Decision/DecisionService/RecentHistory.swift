import Contracts
import GRDB

/// The persons' recent offers and outcomes in memory, so that Decide's caps and
/// suppressions need no SQLite read. It mirrors the `offer` and `outcome` tables for every
/// time after `coveredAfterMs`, up to `limit` entries: past the limit, the oldest quarter
/// goes and the covered span starts later. A history reaching back before it is read from
/// the file instead (`DecisionStore.history`), so the answer is the same either way.
///
/// Changed only inside the log's write transactions (and the identity feed's), under the
/// store's lock; a transaction that fails reloads it from the file.
struct RecentHistory: Sendable {
    /// Every offer and outcome after this time is here (`Int64.min`: all of them).
    private(set) var coveredAfterMs: Int64
    private(set) var byPerson: [String: DecisionStore.History] = [:]
    /// Offers and outcomes held, for `limit`.
    private(set) var entries = 0
    /// How many are held per minute: where to cut when `limit` is passed.
    private var perMinute: [Int64: Int] = [:]
    let limit: Int

    /// Nothing held; with `limit` 0, nothing is ever covered (every read goes to the file).
    init(limit: Int) {
        self.limit = limit
        coveredAfterMs = limit > 0 ? .min : .max
    }

    /// The newest `limit` offers and outcomes of the file (of each kind; fewer when the file
    /// holds more, and then the covered span starts at the oldest kept).
    static func load(_ db: Database, limit: Int) throws -> RecentHistory {
        var recent = RecentHistory(limit: limit)
        guard limit > 0 else { return recent }
        var oldest: [Int64] = []
        let offers = try Row.fetchCursor(db, sql: """
            SELECT person_id, action_id, channel, at_ms FROM offer WHERE action_id != '' ORDER BY at_ms DESC LIMIT ?
            """, arguments: [limit])
        var count = 0
        while let row = try offers.next() {
            recent.addOffer(person: row[0], action: row[1], channel: row[2], atMs: row[3])
            count += 1
            if count == limit { oldest.append(row[3]) }
        }
        count = 0
        let outcomes = try Row.fetchCursor(db, sql: """
            SELECT person_id, action_id, kind, occurred_at_ms FROM outcome WHERE person_id != '' ORDER BY occurred_at_ms DESC LIMIT ?
            """, arguments: [limit])
        while let row = try outcomes.next() {
            recent.addOutcome(person: row[0], action: row[1], kind: DecisionV1.Outcome(rawValue: row[2]), atMs: row[3])
            count += 1
            if count == limit { oldest.append(row[3]) }
        }
        // Rows at the oldest time kept may have been cut: only later ones are covered.
        if let bound = oldest.max() { recent.coveredAfterMs = bound }
        recent.shrink()
        return recent
    }

    /// The person's offers and outcomes after `sinceMs`, or nil when that reaches back
    /// before the covered span.
    func history(of person: String, sinceMs: Int64) -> DecisionStore.History? {
        guard sinceMs >= coveredAfterMs else { return nil }
        guard let held = byPerson[person] else { return DecisionStore.History() }
        var history = DecisionStore.History()
        history.offers = held.offers.filter { $0.atMs > sinceMs }
        history.outcomes = held.outcomes.filter { $0.atMs > sinceMs }
        return history
    }

    mutating func addOffer(person: String, action: String, channel: Int32, atMs: Int64) {
        guard limit > 0 else { return }
        byPerson[person, default: .init()].offers.append((action, channel, atMs))
        counted(atMs, 1)
    }

    mutating func addOutcome(person: String, action: String, kind: DecisionV1.Outcome, atMs: Int64) {
        guard limit > 0 else { return }
        byPerson[person, default: .init()].outcomes.append((action, kind, atMs))
        counted(atMs, 1)
    }

    /// A merge: the source's offers and outcomes become the target's.
    mutating func move(_ source: String, to target: String) {
        guard let moved = byPerson.removeValue(forKey: source) else { return }
        byPerson[target, default: .init()].offers += moved.offers
        byPerson[target, default: .init()].outcomes += moved.outcomes
    }

    /// An erasure.
    mutating func remove(_ person: String) {
        guard let removed = byPerson.removeValue(forKey: person) else { return }
        for offer in removed.offers { counted(offer.atMs, -1) }
        for outcome in removed.outcomes { counted(outcome.atMs, -1) }
    }

    private static func minute(_ atMs: Int64) -> Int64 { atMs >= 0 ? atMs / 60_000 : (atMs + 1) / 60_000 - 1 }

    private mutating func counted(_ atMs: Int64, _ delta: Int) {
        let minute = Self.minute(atMs)
        perMinute[minute, default: 0] += delta
        if perMinute[minute] == 0 { perMinute[minute] = nil }
        entries += delta
        if entries > limit { shrink() }
    }

    /// Past `limit`, keeps the newest minutes holding at most three quarters of it (so the
    /// next cut is `limit / 4` additions away), and drops what is no longer covered.
    private mutating func shrink() {
        if entries > limit {
            var kept = 0
            for minute in perMinute.keys.sorted(by: >) {
                kept += perMinute[minute]!
                if kept > limit * 3 / 4 {
                    coveredAfterMs = max(coveredAfterMs, (minute + 1) * 60_000 - 1)
                    break
                }
            }
        }
        guard coveredAfterMs != .min else { return }
        let bound = coveredAfterMs
        var kept: [String: DecisionStore.History] = [:]
        perMinute = [:]
        entries = 0
        for (person, held) in byPerson {
            let history = DecisionStore.History(offers: held.offers.filter { $0.atMs > bound },
                                                outcomes: held.outcomes.filter { $0.atMs > bound })
            guard !history.offers.isEmpty || !history.outcomes.isEmpty else { continue }
            kept[person] = history
            for time in history.offers.map(\.atMs) + history.outcomes.map(\.atMs) {
                perMinute[Self.minute(time), default: 0] += 1
            }
            entries += history.offers.count + history.outcomes.count
        }
        byPerson = kept
    }
}
