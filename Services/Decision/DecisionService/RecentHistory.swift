import Contracts
import GRDB

/// The persons' recent offers and outcomes in memory, so that Decide's caps and
/// suppressions need no SQLite read. It mirrors the `offer` and `outcome` tables for every
/// time after `coveredAfterMs`, up to `limit` entries: past the limit, the oldest quarter
/// goes and the covered span starts later. A history reaching back before it is read from
/// the file instead (`DecisionStore.history`), so the answer is the same either way.
///
/// Cutting is O(minutes held), not O(entries): the entries it drops are left where they
/// are (no read sees them: every read starts after `coveredAfterMs`) and purged a few
/// persons at a time by later additions, and whenever their person is added to.
///
/// Changed only inside the log's write transactions (and the identity feed's), under the
/// store's lock; a transaction that fails reloads it from the file.
struct RecentHistory: Sendable {
    /// Every offer and outcome after this time is here (`Int64.min`: all of them).
    private(set) var coveredAfterMs: Int64
    /// By person; may still hold entries at or before `coveredAfterMs`, not yet purged.
    private(set) var byPerson = ShardedDictionary<String, DecisionStore.History>()
    /// Offers and outcomes held after `coveredAfterMs`, for `limit`.
    private(set) var entries = 0
    /// How many of `entries` fall in each minute: where to cut when `limit` is passed.
    private var perMinute: [Int64: Int] = [:]
    /// Persons that may hold entries a cut dropped, purged a few per addition.
    private var toPurge: [String] = []
    /// The parts of `byPerson` whose persons go to `toPurge` next, one part at a time: a
    /// copy of every key at once held the lock for milliseconds with 100,000s of persons.
    private var partsToPurge = 0..<0
    let limit: Int

    /// Nothing held; with `limit` 0, nothing is ever covered (every read goes to the file).
    init(limit: Int) {
        self.limit = limit
        coveredAfterMs = limit > 0 ? .min : .max
    }

    /// The file's offers and outcomes, the newest `limit` of them when it holds more: one
    /// pass in the file's order, cutting past the limit as additions do (a row older than
    /// the covered span by then is skipped). Measured on this 2-core machine with 1,000,000
    /// offers and 100,000 outcomes of 300,000 persons: ready in 0.9 s (0.05 s without), 90 MB.
    static func load(_ db: Database, limit: Int) throws -> RecentHistory {
        var recent = RecentHistory(limit: limit)
        guard limit > 0 else { return recent }
        let offers = try Row.fetchCursor(db, sql: "SELECT person_id, action_id, channel, at_ms FROM offer WHERE action_id != ''")
        while let row = try offers.next() {
            recent.addOffer(person: row[0], action: row[1], channel: row[2], atMs: row[3])
        }
        let outcomes = try Row.fetchCursor(db, sql: "SELECT person_id, action_id, kind, occurred_at_ms FROM outcome WHERE person_id != ''")
        while let row = try outcomes.next() {
            recent.addOutcome(person: row[0], action: row[1], kind: DecisionV1.Outcome(rawValue: row[2]), atMs: row[3])
        }
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
        guard atMs > coveredAfterMs else { return }  // before the covered span (and with limit 0)
        purge(person)
        byPerson.update(person, default: .init()) { $0.offers.append((action, channel, atMs)) }
        added(atMs)
    }

    /// The offer of `action` at `atMs` counts on channel `to` instead of `from`.
    mutating func rechannel(person: String, action: String, atMs: Int64, from: Int32, to: Int32) {
        guard var held = byPerson[person],
              let i = held.offers.lastIndex(where: { $0.action == action && $0.atMs == atMs && $0.channel == from }) else { return }
        held.offers[i].channel = to
        byPerson[person] = held
    }

    mutating func addOutcome(person: String, action: String, kind: DecisionV1.Outcome, atMs: Int64) {
        guard atMs > coveredAfterMs else { return }
        purge(person)
        byPerson.update(person, default: .init()) { $0.outcomes.append((action, kind, atMs)) }
        added(atMs)
    }

    /// A merge: the source's offers and outcomes become the target's.
    mutating func move(_ source: String, to target: String) {
        guard let moved = byPerson.removeValue(forKey: source) else { return }
        byPerson.update(target, default: .init()) { held in
            held.offers += moved.offers
            held.outcomes += moved.outcomes
        }
    }

    /// An erasure.
    mutating func remove(_ person: String) {
        guard let removed = byPerson.removeValue(forKey: person) else { return }
        for time in removed.offers.map(\.atMs) + removed.outcomes.map(\.atMs) where time > coveredAfterMs {
            let minute = Self.minute(time)
            guard let count = perMinute[minute] else { continue }
            perMinute[minute] = count > 1 ? count - 1 : nil
            entries -= 1
        }
    }

    /// The person's entries as the file holds them now (after an unmerge or an erasure moved
    /// or deleted some of them), for the covered span.
    mutating func reload(_ person: String, from db: Database) throws {
        remove(person)
        guard coveredAfterMs != .max else { return }
        let since = coveredAfterMs
        for row in try Row.fetchAll(db, sql: "SELECT action_id, channel, at_ms FROM offer WHERE person_id = ? AND at_ms > ? AND action_id != ''",
                                    arguments: [person, since]) {
            addOffer(person: person, action: row[0], channel: row[1], atMs: row[2])
        }
        for row in try Row.fetchAll(db, sql: "SELECT action_id, kind, occurred_at_ms FROM outcome WHERE person_id = ? AND occurred_at_ms > ?",
                                    arguments: [person, since]) {
            addOutcome(person: person, action: row[0], kind: DecisionV1.Outcome(rawValue: row[1]), atMs: row[2])
        }
    }

    private static func minute(_ atMs: Int64) -> Int64 { atMs >= 0 ? atMs / 60_000 : (atMs + 1) / 60_000 - 1 }

    private mutating func added(_ atMs: Int64) {
        perMinute[Self.minute(atMs), default: 0] += 1
        entries += 1
        if entries > limit { cut() }
        // A few persons a cut left entries with, per addition: a cut's leftovers are gone
        // after a fraction of the additions that led to it.
        for _ in 0..<4 {
            while toPurge.isEmpty, let part = partsToPurge.first {  // empty parts cost no turn
                partsToPurge = partsToPurge.dropFirst()
                toPurge = byPerson.keys(inPart: part)
            }
            guard let person = toPurge.popLast() else { break }
            purge(person)
        }
    }

    /// Keeps the newest minutes holding at most three quarters of `limit` (so the next cut
    /// is `limit / 4` additions away): the covered span starts after the others.
    private mutating func cut() {
        var kept = 0
        for minute in perMinute.keys.sorted(by: >) {
            kept += perMinute[minute]!
            if kept > limit * 3 / 4 {
                coveredAfterMs = max(coveredAfterMs, (minute + 1) * 60_000 - 1)
                break
            }
        }
        // The bound is a minute's last millisecond: these minutes hold nothing after it.
        for (minute, count) in perMinute where (minute + 1) * 60_000 - 1 <= coveredAfterMs {
            perMinute[minute] = nil
            entries -= count
        }
        toPurge = []
        partsToPurge = 0..<ShardedDictionary<String, DecisionStore.History>.parts
    }

    /// Drops the person's entries at or before `coveredAfterMs`.
    private mutating func purge(_ person: String) {
        let bound = coveredAfterMs
        guard bound != .min, let held = byPerson[person],
              held.offers.contains(where: { $0.atMs <= bound }) || held.outcomes.contains(where: { $0.atMs <= bound }) else { return }
        let offers = held.offers.filter { $0.atMs > bound }
        let outcomes = held.outcomes.filter { $0.atMs > bound }
        byPerson[person] = offers.isEmpty && outcomes.isEmpty ? nil : DecisionStore.History(offers: offers, outcomes: outcomes)
    }
}
