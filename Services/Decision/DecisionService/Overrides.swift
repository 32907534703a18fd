import Contracts
import Foundation
import GRDB
import RPC
import Rules
import Storage

/// Governed overrides: validation, storage with an audit trail, and matching in Decide.
extension DecisionStore {
    static let maxOverrides = 200

    /// Creates an override (empty id) or changes an active one, after validating every
    /// field against the catalog; each change is written with its audit record.
    public func setOverride(_ request: DecisionV1.Override, nowMs: Int64) throws -> DecisionV1.Override {
        let o = request
        if !o.id.isEmpty { try Names.check(o.id, field: "override.id") }
        guard o.kind == "force" || o.kind == "ban" else {
            throw RPCError.invalidArgument(field: "override.kind", "must be \"force\" or \"ban\", got \"\(o.kind)\"")
        }
        try Names.check(o.actionId, field: "override.action_id")
        guard let action = memory.withLock({ $0.actions[o.actionId] }) else {
            throw RPCError(.notFound, "override.action_id: no action \"\(o.actionId)\"")
        }
        guard !action.action.retired else {
            throw RPCError(.failedPrecondition, "override.action_id: action \"\(o.actionId)\" is retired")
        }
        if !o.segment.isEmpty { try Names.check(o.segment, field: "override.segment") }
        guard o.context.count <= 20 else { throw RPCError.invalidArgument(field: "override.context", "at most 20 entries") }
        for (key, value) in o.context {
            try Names.check(key, field: "override.context key")
            guard value.utf8.count <= 256 else { throw RPCError.invalidArgument(field: "override.context[\(key)]", "is longer than 256 bytes") }
        }
        let reason = o.reason.trimmingCharacters(in: .whitespaces)
        guard !reason.isEmpty, reason.utf8.count <= 500 else {
            throw RPCError.invalidArgument(field: "override.reason", "is required (1-500 bytes): every override says why")
        }
        let author = o.author.trimmingCharacters(in: .whitespaces)
        guard !author.isEmpty, author.utf8.count <= 128 else {
            throw RPCError.invalidArgument(field: "override.author", "is required (1-128 bytes): every override says who")
        }
        guard o.expiresAtMs == 0 || o.expiresAtMs > nowMs else {
            throw RPCError.invalidArgument(field: "override.expires_at_ms", "must be in the future (or 0: until ended)")
        }
        // Memory follows the commit before the writer is released (a second change of the
        // same override must see this one's version).
        return try pool.writeThenUpdate { db in
            let saved = try createOrChange(db, o, reason: reason, author: author, nowMs: nowMs)
            return (saved, { [self] in self.memory.withLock { $0.overrides[saved.id] = saved } })
        }
    }

    private func createOrChange(_ db: Database, _ request: DecisionV1.Override, reason: String, author: String,
                                nowMs: Int64) throws -> DecisionV1.Override {
        var o = request
        let existing = memory.withLock { m in o.id.isEmpty ? nil : m.overrides[o.id] }
        if o.id.isEmpty {
            guard memory.withLock({ m in m.overrides.values.count { Self.isActive($0, nowMs) } }) < Self.maxOverrides else {
                throw RPCError(.resourceExhausted, "override: at most \(Self.maxOverrides) active overrides; end one first")
            }
            o.id = TimeOrderedID.make("o", nowMs: nowMs)
            o.createdAtMs = nowMs
            o.version = 1
        } else {
            guard let existing else { throw RPCError(.notFound, "override.id: no override \"\(o.id)\"") }
            guard Self.isActive(existing, nowMs) else {
                throw RPCError(.failedPrecondition, "override.id: override \"\(o.id)\" has ended; set a new one")
            }
            // What it does and to whom stays: LiftReport measures an override by its id (and
            // assigns its control share by it), so a "force A" turned into a "ban B" would pool
            // two treatments. A change is of its reason, author or expiry.
            for (field, same) in [("kind", o.kind == existing.kind), ("action_id", o.actionId == existing.actionId),
                                  ("segment", o.segment == existing.segment), ("context", o.context == existing.context)] where !same {
                throw RPCError.invalidArgument(field: "override.\(field)",
                    "override \"\(o.id)\" keeps its kind, action, segment and context (only its reason, author and expiry change); end it and set a new one")
            }
            o.createdAtMs = existing.createdAtMs
            o.version = existing.version + 1
        }
        o.reason = reason
        o.author = author
        o.endedAtMs = 0
        o.endedBy = ""
        o.active = true
        try saveOverride(db, o, change: existing == nil ? "created" : "changed", author: author, reason: reason, nowMs: nowMs)
        return o
    }

    /// Ends an override (ending an ended one changes nothing).
    public func endOverride(_ id: String, author: String, reason: String, nowMs: Int64) throws -> DecisionV1.Override {
        try Names.check(id, field: "id")
        let author = author.trimmingCharacters(in: .whitespaces)
        guard !author.isEmpty, author.utf8.count <= 128 else {
            throw RPCError.invalidArgument(field: "author", "is required (1-128 bytes): every change says who")
        }
        let reason = reason.trimmingCharacters(in: .whitespaces)
        guard !reason.isEmpty, reason.utf8.count <= 500 else {
            throw RPCError.invalidArgument(field: "reason", "is required (1-500 bytes): every change says why")
        }
        return try pool.writeThenUpdate { db in
            guard var o = memory.withLock({ $0.overrides[id] }) else { throw RPCError(.notFound, "id: no override \"\(id)\"") }
            guard o.endedAtMs == 0 else { return (o, {}) }
            // One that expired already stopped then: ending it records who and why, not a later stop.
            o.endedAtMs = o.expiresAtMs > 0 ? min(nowMs, o.expiresAtMs) : nowMs
            o.endedBy = author
            o.active = false
            o.version += 1
            try saveOverride(db, o, change: "ended", author: author, reason: reason, nowMs: nowMs)
            let ended = o
            return (o, { [self] in self.memory.withLock { $0.overrides[ended.id] = ended } })
        }
    }

    private func saveOverride(_ db: Database, _ o: DecisionV1.Override, change: String, author: String, reason: String, nowMs: Int64) throws {
        try db.execute(sql: "INSERT OR REPLACE INTO override (id, body) VALUES (?, ?)", arguments: [o.id, Data(o.serializedBytes())])
        var audit = DecisionV1.OverrideChange()
        audit.overrideId = o.id
        audit.atMs = nowMs
        audit.author = author
        audit.change = change
        audit.reason = reason
        audit.override = o
        try db.execute(sql: "INSERT INTO override_change (override_id, version, at_ms, body) VALUES (?, ?, ?, ?)",
                       arguments: [o.id, Int64(o.version), nowMs, Data(audit.serializedBytes())])
    }

    static func isActive(_ o: DecisionV1.Override, _ nowMs: Int64) -> Bool {
        o.endedAtMs == 0 && (o.expiresAtMs == 0 || nowMs < o.expiresAtMs)
    }

    /// The active overrides by creation time (each with `active` true).
    public func activeOverrides(nowMs: Int64) -> [DecisionV1.Override] {
        // Decide asks on every call: the short list kept on write, returned as it is once the
        // expired ones left it.
        memory.withLock { m in
            m.dropExpired(nowMs: nowMs)
            return m.openOverrides
        }
    }

    /// Most encoded bytes of overrides that no longer apply in one ListOverrides (with the
    /// active ones, at most 200 of ~8 KB, and the history's 2 MiB: under the 4 MiB frame).
    static let maxEndedBytes = 512 << 10

    /// Every override by creation time with `active` as of `nowMs`, but of those that no
    /// longer apply (ended or expired) only the `endedLimit` that stopped most recently (and
    /// at most `maxEndedBytes`); and whether some were left out.
    public func overrides(nowMs: Int64, endedLimit: Int) -> (overrides: [DecisionV1.Override], endedTruncated: Bool) {
        let all = memory.withLock { Array($0.overrides.values) }
        var active: [DecisionV1.Override] = [], stopped: [DecisionV1.Override] = []
        for var o in all {
            o.active = Self.isActive(o, nowMs)
            if o.active { active.append(o) } else { stopped.append(o) }
        }
        func stoppedAt(_ o: DecisionV1.Override) -> Int64 { o.endedAtMs != 0 ? o.endedAtMs : o.expiresAtMs }
        stopped.sort { (stoppedAt($0), $0.id) > (stoppedAt($1), $1.id) }
        var truncated = stopped.count > endedLimit
        stopped = Array(stopped.prefix(endedLimit))
        var bytes = 0
        if let cut = stopped.firstIndex(where: { bytes += $0.serializedBytes().count + 8; return bytes > Self.maxEndedBytes }) {
            stopped.removeSubrange(cut...)
            truncated = true
        }
        return ((active + stopped).sorted(by: Self.byCreation), truncated)
    }

    /// Whether an override with this id was ever set.
    public func overrideExists(_ id: String) -> Bool { memory.withLock { $0.overrides[id] != nil } }

    static func byCreation(_ a: DecisionV1.Override, _ b: DecisionV1.Override) -> Bool {
        (a.createdAtMs, a.id) < (b.createdAtMs, b.id)
    }

    /// The newest `limit` audited changes (of one override, or of all), oldest first, and
    /// whether older ones were left out.
    public func overrideHistory(of id: String? = nil, limit: Int = 1000) throws -> (changes: [DecisionV1.OverrideChange], truncated: Bool) {
        try pool.read { db in
            let filter = id == nil ? "" : "WHERE override_id = :id"
            var bodies = try Data.fetchAll(db, sql: """
                SELECT body FROM override_change \(filter) ORDER BY at_ms DESC, override_id DESC, version DESC LIMIT :limit
                """, arguments: ["id": id, "limit": limit + 1])
            var truncated = bodies.count > limit
            if truncated { bodies.removeLast() }
            // And at most `AnswerSize.listBudget` encoded (a change can be 8 KB: large contexts and reasons).
            let fit = AnswerSize.fitting(bodies.lazy.map(\.count), atLeastOne: false)
            if fit < bodies.count {
                bodies.removeSubrange(fit...)
                truncated = true
            }
            return (try bodies.reversed().map { try DecisionV1.OverrideChange(serializedBytes: $0) }, truncated)
        }
    }

    static func loadOverrides(_ db: Database) throws -> [String: DecisionV1.Override] {
        var overrides: [String: DecisionV1.Override] = [:]
        for body in try Data.fetchAll(db, sql: "SELECT body FROM override") {
            let o = try DecisionV1.Override(serializedBytes: body)
            overrides[o.id] = o
        }
        return overrides
    }
}

extension DecisionV1.Override {
    /// Whether the override covers a decision for a person in `segments` with `context`.
    /// When the person's segments are not known (the profile unreachable), a ban scoped to a
    /// segment covers them and a force does not: the safe side of each.
    func matches(segments: Set<String>, context: [String: String], segmentsKnown: Bool) -> Bool {
        let inSegment = segment.isEmpty || (segmentsKnown ? segments.contains(segment) : kind == "ban")
        return inSegment && self.context.allSatisfy { context[$0.key] == $0.value }
    }
}
