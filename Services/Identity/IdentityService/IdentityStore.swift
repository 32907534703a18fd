import Foundation
import GRDB
import Logging
import Storage
import Synchronization

/// The identity graph in SQLite. Every change happens in one write transaction
/// (writes are serialized), and the schema holds the central invariant: an
/// identifier belongs to exactly one person (`identifier` is keyed by type and value).
///
/// Database access is synchronous on the calling thread: a lookup takes microseconds,
/// far less than GRDB's async hop (measured: Resolve 5.5k/s with async reads). The
/// service therefore runs its handlers on the concurrent pool, never on an event loop.
public final class IdentityStore: Sendable {
    let pool: DatabasePool
    /// Keeps the WAL short from its own connection (see BackgroundCheckpointer).
    let checkpointer: BackgroundCheckpointer
    /// The WAL truncation an erasure owes until it succeeds (paid by the next Erase, and
    /// every second by the service's `truncationRetrier`).
    let truncation = OwedTruncation()
    let normalizer: Normalizer
    /// A person's erasure names at most this many of the persons it had absorbed per change
    /// of the feed (more make more changes). Person ids are at most 64 bytes: a change stays
    /// under ~260 KB, so that a ListChanges page always holds it. Default 4,000.
    let erasureChunk: Int
    public static let defaultErasureChunk = 4_000

    /// `startMs`: now, by default; the change feed's numbers start above it (see `appendChange`).
    public init(directory: String, normalizer: Normalizer, startMs: Int64 = Int64(Date().timeIntervalSince1970 * 1000),
                erasureChunk: Int = IdentityStore.defaultErasureChunk) throws {
        self.erasureChunk = max(1, erasureChunk)
        (pool, checkpointer) = try SQLiteStore.openWithCheckpointer(directory: directory, name: "identity", migrator: Self.migrator)
        var normalizer = normalizer
        try pool.write { db in
            try db.execute(sql: "UPDATE feed_floor SET seq = max(seq, ?)", arguments: [startMs.multipliedReportingOverflow(by: 1000).partialValue])
            try Self.checkPrivacyKey(db, normalizer.keyFingerprint)
            if !normalizer.isPrivate { try Self.rewriteExitPrefixNumbers(db, region: normalizer.rules.defaultRegion.uppercased()) }
            // A privacy-mode store that held emails before v10 keeps them as typed (see v10).
            normalizer.composesEmails = try String.fetchOne(db, sql: "SELECT value FROM store_setting WHERE name = 'email_form'") != "as typed"
        }
        self.normalizer = normalizer
    }

    /// Rewrites stored values of `type` (`old` → `new`, each pair once) in `identifier`
    /// and in `merge_member`. A value whose new form is stored already is a copy of one
    /// another row holds: it goes, and so do the merge records naming it (renamed, they
    /// would name the other row, and an unmerge would move that row).
    static func rewriteValues(_ db: Database, type: String, _ pairs: [(old: String, new: String)]) throws {
        for (old, new) in pairs {
            try db.execute(sql: "UPDATE OR IGNORE identifier SET value = ? WHERE type = ? AND value = ?", arguments: [new, type, old])
            if db.changesCount > 0 {
                try db.execute(sql: "UPDATE OR IGNORE merge_member SET value = ? WHERE type = ? AND value = ?", arguments: [new, type, old])
            }
            try db.execute(sql: "DELETE FROM identifier WHERE type = ? AND value = ?", arguments: [type, old])
            try db.execute(sql: "DELETE FROM merge_member WHERE type = ? AND value = ?", arguments: [type, old])
        }
    }

    /// How a number dialled with the region's own international prefix was stored before the
    /// normalizer knew that prefix (`011 44…` in the US as `+1011 44…`, `0011 44…` in
    /// Australia as `+11 44…`, `010 44…` in Japan as `+8110 44…`; none is a valid number).
    static let exitPrefixOldForm: [String: String] = ["US": "+1011", "CA": "+1011", "AU": "+11", "JP": "+8110"]

    /// Rewrites the numbers stored in that old form for `region` (once per region: noted in
    /// `store_setting`), so that the same input finds the same person. One whose new form is
    /// stored already is a copy of a number another row holds, and goes (as in migration v5).
    /// Values stored as keyed hashes (privacy mode) cannot be rewritten.
    static func rewriteExitPrefixNumbers(_ db: Database, region: String) throws {
        guard let old = exitPrefixOldForm[region],
              try String.fetchOne(db, sql: "SELECT value FROM store_setting WHERE name = 'phone_exit_prefix'") != region else { return }
        // The prefix as a range of the (type, value) indexes: its last digit raised by one ends it.
        let end = String(old.dropLast()) + String(UnicodeScalar(old.unicodeScalars.last!.value + 1)!)
        let values = try String.fetchAll(db, sql: """
            SELECT value FROM identifier WHERE type = 'phone' AND value >= ?1 AND value < ?2
            UNION SELECT value FROM merge_member WHERE type = 'phone' AND value >= ?1 AND value < ?2
            """, arguments: [old, end])
        try rewriteValues(db, type: "phone", values.compactMap { value in
            guard case .success(let number) = Normalizer.e164("+" + value.dropFirst(old.count), region: region), number != value else { return nil }
            return (value, number)
        })
        try db.execute(sql: "INSERT OR REPLACE INTO store_setting (name, value) VALUES ('phone_exit_prefix', ?)", arguments: [region])
    }

    /// The store was written with another privacy key, or with none, than the one given: every
    /// lookup would miss what it holds, and each known identifier would make a new person.
    public struct PrivacyKeyMismatch: Error, CustomStringConvertible, Sendable {
        public var stored: String
        public var given: String
        public var description: String {
            switch (stored, given) {
            case ("none", _):
                "the store holds identifiers in the clear (it was written without privacy_key_file); with a key every lookup would miss them. Start without the key, or with an empty data directory"
            case (_, "none"):
                "the store holds keyed hashes (it was written with privacy_key_file, key \(stored)); without that key every lookup would miss them"
            default:
                "the store was written with another privacy key (\(stored); this one is \(given)); every lookup would miss. Start with the key it was written with"
            }
        }
    }

    /// Refuses a privacy key (or its absence) other than the one the store was written with.
    /// A store from before this check is judged by its identifiers, then remembers the key.
    static func checkPrivacyKey(_ db: Database, _ given: String) throws {
        if let stored = try String.fetchOne(db, sql: "SELECT value FROM store_setting WHERE name = 'privacy_key'") {
            guard stored == given else { throw PrivacyKeyMismatch(stored: stored, given: given) }
            return
        }
        let hashed = "length(value) = 66 AND value GLOB 'h:*' AND substr(value, 3) NOT GLOB '*[^0-9a-f]*'"
        if given == "none", try Bool.fetchOne(db, sql: "SELECT EXISTS (SELECT 1 FROM identifier WHERE \(hashed))")! {
            throw PrivacyKeyMismatch(stored: "an unknown key", given: given)
        }
        if given != "none", try Bool.fetchOne(db, sql: "SELECT EXISTS (SELECT 1 FROM identifier WHERE NOT (\(hashed)))")! {
            throw PrivacyKeyMismatch(stored: "none", given: given)
        }
        try db.execute(sql: "INSERT INTO store_setting (name, value) VALUES ('privacy_key', ?)", arguments: [given])
    }

    /// A read on the calling thread (synchronous GRDB access; see the type's note).
    func reading<T>(_ body: (Database) throws -> T) throws -> T { try pool.read(body) }

    /// A write transaction on the calling thread.
    func writing<T>(_ body: (Database) throws -> T) throws -> T { try pool.write(body) }

    /// Tries every `interval` an erasure's WAL truncation that failed (or that a crash cut
    /// off: a new store owes one), once each, without waiting for readers. Run it as a service.
    public func truncationRetrier(interval: Duration = .seconds(1), logger: Logger) -> OwedTruncation.Retrier {
        truncation.retrier(pool, interval: interval, logger: logger)
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.execute(sql: """
                CREATE TABLE person (
                  seq INTEGER PRIMARY KEY,               -- creation order: the oldest person survives a merge
                  id TEXT NOT NULL UNIQUE,
                  created_at_ms INTEGER NOT NULL,
                  state TEXT NOT NULL CHECK (state IN ('active', 'merged', 'erased')),
                  merged_into TEXT REFERENCES person(id),
                  CHECK ((state = 'merged') = (merged_into IS NOT NULL))
                );
                CREATE TABLE identifier (
                  type TEXT NOT NULL,
                  value TEXT NOT NULL,                   -- normalized, or an HMAC in privacy mode
                  person_id TEXT NOT NULL REFERENCES person(id),
                  first_seen_ms INTEGER NOT NULL,
                  last_seen_ms INTEGER NOT NULL,
                  source TEXT NOT NULL,
                  PRIMARY KEY (type, value)
                ) WITHOUT ROWID;
                CREATE INDEX identifier_by_person ON identifier(person_id);
                CREATE TABLE merge (
                  id INTEGER PRIMARY KEY,
                  target TEXT NOT NULL REFERENCES person(id),
                  source TEXT NOT NULL REFERENCES person(id),
                  cause TEXT NOT NULL,
                  at_ms INTEGER NOT NULL,
                  undone INTEGER NOT NULL DEFAULT 0
                );
                CREATE TABLE merge_member (               -- the identifiers a merge moved
                  merge_id INTEGER NOT NULL REFERENCES merge(id),
                  type TEXT NOT NULL,
                  value TEXT NOT NULL,
                  PRIMARY KEY (merge_id, type, value)
                ) WITHOUT ROWID;
                CREATE TABLE split (                      -- persons an operator separated: never merged automatically again
                  a TEXT NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a, b)
                ) WITHOUT ROWID;
                CREATE TABLE conflict (
                  id INTEGER PRIMARY KEY,
                  person_ids TEXT NOT NULL,
                  rule TEXT NOT NULL,
                  identifier_type TEXT NOT NULL,
                  cause TEXT NOT NULL,
                  at_ms INTEGER NOT NULL
                );
                CREATE TABLE change (                     -- the change feed: seq is increasing (see appendChange)
                  seq INTEGER PRIMARY KEY,
                  kind INTEGER NOT NULL,
                  target TEXT NOT NULL,
                  sources TEXT NOT NULL,
                  cause TEXT NOT NULL,
                  at_ms INTEGER NOT NULL
                );
                CREATE INDEX change_by_target ON change(target);
                """)
        }
        migrator.registerMigration("v2: merge ids in the feed, absorbed persons indexed") { db in
            // Every merge re-points the persons its source had absorbed, and erasure and
            // unmerge look them up: without an index each was a scan of every person.
            try db.execute(sql: """
                CREATE INDEX person_by_merged_into ON person(merged_into) WHERE merged_into IS NOT NULL;
                ALTER TABLE change ADD COLUMN merge_id INTEGER NOT NULL DEFAULT 0;  -- MERGE: the merge, for Unmerge
                UPDATE change SET merge_id = coalesce((SELECT m.id FROM merge m WHERE m.target = change.target
                  AND m.source = change.sources AND m.at_ms = change.at_ms ORDER BY m.id LIMIT 1), 0) WHERE kind = 1;
                """)
        }
        migrator.registerMigration("v3: changes and conflicts by person") { db in
            // History found a person's entries by reading every change and conflict; these find
            // them by person (target and sources of a change, every person of a conflict).
            try db.execute(sql: """
                CREATE TABLE change_person (person_id TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (person_id, seq)) WITHOUT ROWID;
                CREATE TABLE conflict_person (person_id TEXT NOT NULL, conflict_id INTEGER NOT NULL, PRIMARY KEY (person_id, conflict_id)) WITHOUT ROWID;
                WITH RECURSIVE part(seq, rest, person) AS (
                  SELECT seq, sources || ',', target FROM change
                  UNION ALL SELECT seq, substr(rest, instr(rest, ',') + 1), substr(rest, 1, instr(rest, ',') - 1) FROM part WHERE rest <> '')
                INSERT OR IGNORE INTO change_person (person_id, seq) SELECT person, seq FROM part WHERE person <> '';
                WITH RECURSIVE part(id, rest, person) AS (
                  SELECT id, person_ids || ',', '' FROM conflict
                  UNION ALL SELECT id, substr(rest, instr(rest, ',') + 1), substr(rest, 1, instr(rest, ',') - 1) FROM part WHERE rest <> '')
                INSERT OR IGNORE INTO conflict_person (person_id, conflict_id) SELECT person, id FROM part WHERE person <> '';
                """)
        }
        migrator.registerMigration("v4: phone numbers without a trunk 0 after the country code") { db in
            // The normalizer drops a trunk 0 written after the calling code (+44 (0)20…, +31 06…)
            // since this version; numbers stored before with it are rewritten, so the same input
            // finds the same person. One already stored in the new form keeps both rows (no
            // merge is made here). Values stored as keyed hashes (privacy mode) cannot be
            // rewritten: such a number is found again only as typed the new way.
            for code in PhoneRegions.trunkZeroCodes {
                for table in ["identifier", "merge_member"] {
                    try db.execute(sql: """
                        UPDATE OR IGNORE \(table) SET value = '+' || ?1 || substr(value, ?2)
                        WHERE type = 'phone' AND value LIKE '+' || ?1 || '0%'
                        """, arguments: [code, code.count + 3])
                }
            }
        }
        migrator.registerMigration("v5: merges found by person and by identifier; old-form phone duplicates removed") { db in
            // Erasure cleared each erased person's merges and merge members by scanning both
            // tables, once per person of the cluster, holding the only writer meanwhile.
            try db.execute(sql: """
                CREATE INDEX merge_by_target ON merge(target);
                CREATE INDEX merge_by_source ON merge(source);
                CREATE INDEX merge_member_by_identifier ON merge_member(type, value);
                """)
            // v4 left a number stored with its trunk 0 where the same number was stored
            // without it too (UPDATE OR IGNORE). No input finds that old form any more, and
            // erasing the number removed only the new one: the old row, a copy of a number
            // another row holds, goes.
            for code in PhoneRegions.trunkZeroCodes {
                for table in ["identifier", "merge_member"] {
                    try db.execute(sql: "DELETE FROM \(table) WHERE type = 'phone' AND value LIKE '+' || ?1 || '0%'", arguments: [code])
                }
            }
        }
        migrator.registerMigration("v6: change feed numbers never reused") { db in
            // The least number of the next change: raised to the start time (µs) at each open.
            try db.execute(sql: "CREATE TABLE feed_floor (seq INTEGER NOT NULL); INSERT INTO feed_floor VALUES (0);")
        }
        migrator.registerMigration("v7: the privacy key the store is written with") { db in
            try db.execute(sql: "CREATE TABLE store_setting (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
        }
        migrator.registerMigration("v8: where a conflict falls in the feed") { db in
            // The last change number when the conflict was recorded, so that History lists
            // entries in the order they were recorded (NULL: recorded before this version).
            try db.execute(sql: "ALTER TABLE conflict ADD COLUMN after_seq INTEGER")
        }
        migrator.registerMigration("v9: conflicts from before v8 placed") { db in
            // A conflict recorded before v8 goes after the last change of its persons at or
            // before its time (through the indexes by person: no scan of the feed).
            try db.execute(sql: """
                UPDATE conflict SET after_seq = coalesce((
                  SELECT max(c.seq) FROM conflict_person cp JOIN change_person p ON p.person_id = cp.person_id JOIN change c ON c.seq = p.seq
                  WHERE cp.conflict_id = conflict.id AND c.at_ms <= conflict.at_ms), 0)
                WHERE after_seq IS NULL
                """)
        }
        migrator.registerMigration("v10: emails in Unicode's composed form (NFC)") { db in
            // The normalizer composes an email since this version (`é` typed as e and an accent
            // is `é`); addresses stored before in another form are rewritten, so that the same
            // address finds the same person (`rewriteValues`: a copy of an address stored
            // composed already goes). Only non-ASCII values can change.
            // Keyed hashes (privacy mode) cannot be rewritten: a store that holds hashed emails
            // keeps reading emails as typed (`email_form`), so that the same input still finds
            // its hash.
            let hashed = "length(value) = 66 AND value GLOB 'h:*' AND substr(value, 3) NOT GLOB '*[^0-9a-f]*'"
            if try Bool.fetchOne(db, sql: "SELECT EXISTS (SELECT 1 FROM identifier WHERE type = 'email' AND \(hashed))")! {
                try db.execute(sql: "INSERT OR REPLACE INTO store_setting (name, value) VALUES ('email_form', 'as typed')")
            }
            let values = try String.fetchAll(db, sql: """
                SELECT value FROM identifier WHERE type = 'email' AND value GLOB '*[^ -~]*'
                UNION SELECT value FROM merge_member WHERE type = 'email' AND value GLOB '*[^ -~]*'
                """)
            try rewriteValues(db, type: "email", values.compactMap { value in
                let composed = value.precomposedStringWithCanonicalMapping
                // By bytes: Swift's == holds for canonically equivalent strings.
                return composed.utf8.elementsEqual(value.utf8) ? nil : (value, composed)
            })
        }
        migrator.registerMigration("v11: values trimmed of invisible format characters") { db in
            // The normalizer trims a byte-order mark and zero-width characters from a value's
            // ends since this version (`Normalizer.blank`): values stored with them are
            // rewritten, so that lookups and Erase find them (a copy of a value stored trimmed
            // already goes, as in v10). Only non-ASCII values can change; keyed hashes are ASCII.
            let rows = try Row.fetchAll(db, sql: """
                SELECT type, value FROM identifier WHERE value GLOB '*[^ -~]*'
                UNION SELECT type, value FROM merge_member WHERE value GLOB '*[^ -~]*'
                """)
            var pairs: [String: [(old: String, new: String)]] = [:]
            for row in rows {
                let (type, value): (String, String) = (row[0], row[1])
                let trimmed = value.trimmingCharacters(in: Normalizer.blank)
                if !trimmed.isEmpty, !trimmed.utf8.elementsEqual(value.utf8) { pairs[type, default: []].append((value, trimmed)) }
            }
            for (type, list) in pairs.sorted(by: { $0.key < $1.key }) { try rewriteValues(db, type: type, list) }
        }
        return migrator
    }

    // MARK: - Types

    public struct StoredIdentifier: Hashable, Sendable {
        public var type: String
        public var value: String
        public var firstSeenMs: Int64
        public var lastSeenMs: Int64
        public var source: String
    }

    public struct PersonRecord: Hashable, Sendable {
        public var id: String
        public var createdAtMs: Int64
        public var identifiers: [StoredIdentifier]
    }

    public enum ChangeKind: Int, Sendable { case merge = 1, unmerge = 2, erase = 3, conflict = 4 }

    public struct ChangeRecord: Hashable, Sendable {
        public var seq: Int64
        public var kind: ChangeKind
        public var target: String
        public var sources: [String]
        public var cause: String
        public var atMs: Int64
        /// MERGE: the merge's id (what Unmerge's `merge_id` names); 0 otherwise.
        public var mergeID: Int64 = 0
    }

    public struct Conflict: Hashable, Sendable {
        public var rule: String
        public var identifierType: String
        public var personIDs: [String]
    }

    public struct LinkResult: Sendable {
        public var personID: String
        public var mergedPersonIDs: [String]
        public var conflicts: [Conflict]
        /// The link made the person (none of the identifiers was known).
        public var created = false
        /// The identifiers that were known when the link was written.
        public var known: [NormalizedIdentifier] = []
    }

    public struct ResolveResult: Sendable {
        public var personID: String?
        public var matched: [NormalizedIdentifier]
        public var created: Bool
    }

    public enum StoreError: Error, Equatable, Sendable {
        case personNotFound(String)
        case personErased(String)
        case identifierNotFound(String)
        case mergeNotFound(Int64)
        case invalid(String)
        /// The request is well formed, but the store's state does not allow it now.
        case precondition(String)
    }

    // MARK: - Reads

    /// The person `identifiers` belong to, without writing anything unless `create`.
    public func resolve(_ identifiers: [NormalizedIdentifier], create: Bool, source: String, nowMs: Int64) async throws -> ResolveResult {
        let keys = identifiers.map { ($0, normalizer.storedValue($0)) }
        let (found, oldestFirst) = try reading { db in
            let found = try Self.owners(db, keys.map(\.1), keys.map(\.0.type))
            return (found, try Set(found.map(\.person)).sorted { try Self.seq(db, $0) < Self.seq(db, $1) })
        }
        if !found.isEmpty || !create {
            let best = bestPerson(found.map { ($0.type, $0.person) }, oldestFirst: oldestFirst)
            let matched = keys.filter { key in found.contains { $0.type == key.0.type && $0.value == key.1 } }.map(\.0)
            return ResolveResult(personID: best, matched: matched, created: false)
        }
        // Nothing known and asked to create: a link of these identifiers does exactly that (or
        // finds the person a concurrent call made meanwhile: then it was not created here).
        let linked = try await link(identifiers, source: source, observedAtMs: nowMs)
        return ResolveResult(personID: linked.personID, matched: linked.known, created: linked.created)
    }

    /// The person `id` names (its survivor), with up to `limit` of its identifiers in (type,
    /// value) order, those after `after` when given.
    public func person(_ id: String, after: (type: String, value: String)? = nil, limit: Int = .max) async throws -> PersonRecord {
        try reading { db in
            let survivor = try Self.survivor(db, id)
            guard let row = try Row.fetchOne(db, sql: "SELECT created_at_ms FROM person WHERE id = ?", arguments: [survivor]) else {
                throw StoreError.personNotFound(id)
            }
            let identifiers = try Row.fetchAll(db, sql: """
                SELECT type, value, first_seen_ms, last_seen_ms, source FROM identifier
                WHERE person_id = ?1 AND (type, value) > (?2, ?3) ORDER BY type, value LIMIT ?4
                """, arguments: [survivor, after?.type ?? "", after?.value ?? "", limit]).map {
                StoredIdentifier(type: $0["type"], value: $0["value"], firstSeenMs: $0["first_seen_ms"],
                                 lastSeenMs: $0["last_seen_ms"], source: $0["source"])
            }
            return PersonRecord(id: survivor, createdAtMs: row["created_at_ms"], identifiers: identifiers)
        }
    }

    /// The latest `limit` merges, unmerges, erasures and conflicts that involve `id` (or the
    /// persons merged into it), oldest first, and whether there were more. Two queries
    /// whatever the number of persons merged in, each reading at most `limit` + 1 entries.
    public func history(_ id: String, limit: Int) async throws -> (entries: [ChangeRecord], truncated: Bool) {
        try reading { db in
            let survivor = try Self.survivor(db, id)
            let involved = "SELECT ?1 UNION ALL SELECT id FROM person WHERE merged_into = ?1"
            // An entry of several of them is kept once (IN, not a join).
            let changes = try Self.fetchChanges(db, sql: """
                SELECT * FROM change WHERE seq IN (SELECT seq FROM change_person WHERE person_id IN (\(involved)))
                ORDER BY seq DESC LIMIT ?2
                """, arguments: [survivor, limit + 1])
            let conflicts = try Row.fetchAll(db.cachedStatement(sql: """
                SELECT * FROM conflict WHERE id IN (SELECT conflict_id FROM conflict_person WHERE person_id IN (\(involved)))
                ORDER BY coalesce(after_seq, 0) DESC, id DESC LIMIT ?2
                """), arguments: [survivor, limit + 1]).map { row in
                let persons = (row["person_ids"] as String).split(separator: ",").map(String.init)
                return (key: ((row["after_seq"] as Int64?) ?? 0, 1, row["id"] as Int64),
                        record: ChangeRecord(seq: 0, kind: .conflict, target: persons.first ?? "", sources: Array(persons.dropFirst()),
                                             cause: "\(row["rule"] as String) (\(row["cause"] as String))", atMs: row["at_ms"]))
            }
            // In the order they were recorded (not by their times, which clients give): changes
            // by number, each conflict after the last change recorded before it (migrations v8, v9).
            // The latest `limit` of both together are among the latest `limit` of each.
            let keyed = changes.map { (key: ($0.seq, 0, Int64(0)), record: $0) } + conflicts
            let entries = keyed.sorted { $0.key < $1.key }.map(\.record)
            return (Array(entries.suffix(limit)), entries.count > limit)
        }
    }

    public func changes(after seq: Int64, limit: Int) async throws -> [ChangeRecord] {
        try reading { db in
            try Self.fetchChanges(db, sql: "SELECT * FROM change WHERE seq > ? ORDER BY seq LIMIT ?", arguments: [seq, limit])
        }
    }

    // MARK: - Writes

    /// Imports persons in bulk (a migration from another system, a benchmark's seed): each
    /// element is one person's identifiers, all unknown so far. One transaction per 10,000
    /// persons; no merges are evaluated. Returns the new person ids.
    @discardableResult
    public func bulkImport(_ persons: [[NormalizedIdentifier]], source: String, atMs: Int64) async throws -> [String] {
        var ids: [String] = []
        ids.reserveCapacity(persons.count)
        for start in stride(from: 0, to: persons.count, by: 10_000) {
            let batch = persons[start..<min(start + 10_000, persons.count)].map { $0.map { ($0.type, normalizer.storedValue($0)) } }
            ids += try writing { db in
                try batch.map { identifiers in
                    let person = try Self.createPerson(db, nowMs: atMs)
                    for (type, value) in identifiers {
                        try Self.insertIdentifier(db, type, value, person: person, atMs: atMs, source: source)
                    }
                    return person
                }
            }
        }
        return ids
    }

    /// Records `identifiers` as seen together: one person, merging the persons they
    /// belonged to unless a limit (or an operator's split) forbids it.
    public func link(_ identifiers: [NormalizedIdentifier], source: String, observedAtMs: Int64) async throws -> LinkResult {
        let keys = Dictionary(identifiers.map { ($0, normalizer.storedValue($0)) }, uniquingKeysWith: { a, _ in a })
        let rules = normalizer.rules
        return try writing { db in
            let owners = try Self.owners(db, Array(keys.values), Array(keys.keys.map(\.type)))
            let ownerOf = Dictionary(owners.map { ("\($0.type)\u{1}\($0.value)", $0.person) }, uniquingKeysWith: { a, _ in a })
            let unknown = keys.filter { ownerOf["\($0.key.type)\u{1}\($0.value)"] == nil }
            var persons = Array(Set(owners.map(\.person)))
            persons = try persons.sorted { try Self.seq(db, $0) < Self.seq(db, $1) }
            var conflicts: [Conflict] = []
            var merged: [String] = []

            let target: String
            var created = false
            if persons.isEmpty {
                target = try Self.createPerson(db, nowMs: observedAtMs)
                created = true
            } else if persons.count == 1 {
                target = persons[0]
            } else if let blocked = try Self.mergeBlocker(db, persons: persons, adding: [], rules: rules) {
                // No merge. New identifiers join the person of the highest-priority identifier.
                target = self.bestPerson(owners.map { ($0.type, $0.person) }, oldestFirst: persons)!
                conflicts.append(Conflict(rule: blocked.rule, identifierType: blocked.type, personIDs: persons))
                try Self.recordConflict(db, persons: persons, rule: blocked.rule, type: blocked.type, cause: source, atMs: observedAtMs)
            } else {
                // Merge everything into the oldest person.
                target = persons[0]
                for other in persons.dropFirst() {
                    try Self.merge(db, source: other, into: target, cause: source, atMs: observedAtMs)
                    merged.append(other)
                }
            }

            // Attach unknown identifiers, each only within its type's limit.
            var counts = unknown.isEmpty ? [:] : try Self.typeCounts(db, target)
            for (id, stored) in unknown.sorted(by: { $0.key < $1.key }) {
                if let limit = rules.limits[id.type], counts[id.type, default: 0] >= limit {
                    // Over the limit: it becomes its own person rather than overload this one.
                    let rule = "max \(limit) \(id.type) per person"
                    let own = try Self.createPerson(db, nowMs: observedAtMs)
                    try Self.insertIdentifier(db, id.type, stored, person: own, atMs: observedAtMs, source: source)
                    conflicts.append(Conflict(rule: rule, identifierType: id.type, personIDs: [target, own]))
                    try Self.recordConflict(db, persons: [target, own], rule: rule, type: id.type, cause: source, atMs: observedAtMs)
                    continue
                }
                try Self.insertIdentifier(db, id.type, stored, person: target, atMs: observedAtMs, source: source)
                counts[id.type, default: 0] += 1
            }
            // Known identifiers: widen their seen window (late and out-of-order observations count).
            for (id, stored) in keys where ownerOf["\(id.type)\u{1}\(stored)"] != nil {
                try db.cachedStatement(sql: """
                    UPDATE identifier SET first_seen_ms = MIN(first_seen_ms, ?1), last_seen_ms = MAX(last_seen_ms, ?1)
                    WHERE type = ?2 AND value = ?3 AND (first_seen_ms > ?1 OR last_seen_ms < ?1)
                    """).execute(arguments: [observedAtMs, id.type, stored])
            }
            let known = identifiers.filter { id in keys[id].map { ownerOf["\(id.type)\u{1}\($0)"] != nil } ?? false }
            return LinkResult(personID: target, mergedPersonIDs: merged, conflicts: conflicts, created: created, known: known)
        }
    }

    /// Detaches `identifiers` from `personID` into a new person, or, with `mergeID`, gives
    /// the person merged by that merge its identifiers back. Returns the person split from
    /// (the one `personID` names now) and the person split off.
    public func unmerge(personID: String, identifiers: [NormalizedIdentifier], mergeID: Int64?, reason: String,
                        nowMs: Int64) async throws -> (survivor: String, split: String) {
        let stored = identifiers.map { ($0.type, normalizer.storedValue($0)) }
        return try writing { db in
            let survivor = try Self.survivor(db, personID)
            let split: String
            var moving: [(String, String)]
            // Who the split person is kept apart from: the person it was split from as it is
            // now, and the persons it was split from in fact (the merge's target; the persons
            // the detached identifiers came from), which an unmerge may make persons again.
            var apartFrom: Set<String> = [survivor]
            if let mergeID {
                guard let row = try Row.fetchOne(db, sql: "SELECT target, source, undone FROM merge WHERE id = ?", arguments: [mergeID]),
                      try Self.survivor(db, row["target"]) == survivor else {
                    throw StoreError.mergeNotFound(mergeID)
                }
                guard (row["undone"] as Int) == 0 else { throw StoreError.precondition("merge_id: merge \(mergeID) was already undone") }
                split = row["source"]
                apartFrom.insert(row["target"])
                guard try String.fetchOne(db, sql: "SELECT state FROM person WHERE id = ?", arguments: [split]) == "merged" else {
                    throw StoreError.precondition("merge_id: person \(split), merged by merge \(mergeID), was erased since")
                }
                moving = try Row.fetchAll(db, sql: """
                    SELECT m.type, m.value FROM merge_member m JOIN identifier i ON i.type = m.type AND i.value = m.value
                    WHERE m.merge_id = ? AND i.person_id = ?
                    """, arguments: [mergeID, survivor]).map { ($0["type"], $0["value"]) }
                // The former person comes back under its own id, and with the persons it had absorbed:
                // their identifiers come back with it (merge_member), and so must they (the merge
                // had pointed them at the survivor). Found through the merges into it, and into them.
                try db.execute(sql: "UPDATE person SET state = 'active', merged_into = NULL WHERE id = ?", arguments: [split])
                try db.execute(sql: """
                    WITH RECURSIVE absorbed(id) AS (
                      SELECT source FROM merge WHERE target = ?1 AND id < ?2 AND undone = 0
                      UNION SELECT m.source FROM merge m JOIN absorbed a ON m.target = a.id WHERE m.id < ?2 AND m.undone = 0)
                    UPDATE person SET merged_into = ?1 WHERE state = 'merged' AND merged_into = ?3 AND id IN (SELECT id FROM absorbed)
                    """, arguments: [split, mergeID, survivor])
                try db.execute(sql: "UPDATE merge SET undone = 1 WHERE id = ?", arguments: [mergeID])
            } else {
                guard !stored.isEmpty else { throw StoreError.invalid("identifiers: name identifiers to detach, or a merge_id") }
                for (type, value) in stored {
                    let owner = try String.fetchOne(db, sql: "SELECT person_id FROM identifier WHERE type = ? AND value = ?", arguments: [type, value])
                    guard owner == survivor else { throw StoreError.identifierNotFound(type) }
                }
                let remaining = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM identifier WHERE person_id = ?", arguments: [survivor])!
                guard remaining > stored.count else {
                    throw StoreError.precondition("identifiers: cannot detach every identifier of \(survivor)")
                }
                split = try Self.createPerson(db, nowMs: nowMs)
                moving = stored
                let owners = try db.cachedStatement(sql: """
                    SELECT DISTINCT g.source FROM merge_member m JOIN merge g ON g.id = m.merge_id
                    WHERE m.type = ? AND m.value = ? AND g.undone = 0
                    """)
                for (type, value) in stored { apartFrom.formUnion(try String.fetchAll(owners, arguments: [type, value])) }
            }
            for (type, value) in moving {
                try db.execute(sql: "UPDATE identifier SET person_id = ? WHERE type = ? AND value = ?", arguments: [split, type, value])
            }
            for other in apartFrom.sorted() where other != split {
                let (a, b) = other < split ? (other, split) : (split, other)
                try db.execute(sql: "INSERT OR IGNORE INTO split (a, b) VALUES (?, ?)", arguments: [a, b])
            }
            try Self.appendChange(db, .unmerge, target: survivor, sources: [split], cause: reason, atMs: nowMs)
            return (survivor, split)
        }
    }

    /// Erases a person (with every person merged into it): identifiers, merge records and
    /// conflicts go; a tombstone without personal data stays; the change feed says so.
    /// Erasing an erased person again answers its erasure's change and truncates the WAL
    /// again: a retry completes an erasure whose truncation failed (the rows were deleted,
    /// their old pages may still be in the WAL).
    public func erase(personID: String, nowMs: Int64) async throws -> (seq: Int64, removed: Int) {
        let result = try writing { db -> (Int64, Int) in
            let survivor: String
            do {
                survivor = try Self.survivor(db, personID)
            } catch StoreError.personErased {
                // Erased before: its change again (the last of the erasure's changes, by either
                // id), and the truncation if still owed.
                let erase = ChangeKind.erase.rawValue
                let erased = try String.fetchOne(db, sql: """
                    SELECT c.target FROM change_person p JOIN change c ON c.seq = p.seq WHERE p.person_id = ? AND c.kind = ? ORDER BY c.seq DESC LIMIT 1
                    """, arguments: [personID, erase]) ?? personID
                let seq = try Int64.fetchOne(db, sql: """
                    SELECT max(c.seq) FROM change_person p JOIN change c ON c.seq = p.seq WHERE p.person_id = ?1 AND c.kind = ?2 AND c.target = ?1
                    """, arguments: [erased, erase]) ?? 0
                return (seq, 0)
            }
            let absorbed = try String.fetchAll(db, sql: "SELECT id FROM person WHERE merged_into = ?", arguments: [survivor])
            let all = [survivor] + absorbed
            var removed = 0
            for person in all {
                try db.execute(sql: """
                    DELETE FROM merge_member WHERE (type, value) IN (SELECT type, value FROM identifier WHERE person_id = ?)
                    """, arguments: [person])
                try db.execute(sql: "DELETE FROM identifier WHERE person_id = ?", arguments: [person])
                removed += db.changesCount
                try db.execute(sql: "UPDATE merge SET cause = '' WHERE target = ?1 OR source = ?1", arguments: [person])
                for row in try Row.fetchAll(db, sql: """
                    SELECT c.id, c.person_ids FROM conflict c JOIN conflict_person p ON p.conflict_id = c.id WHERE p.person_id = ?
                    """, arguments: [person]) {
                    let id: Int64 = row[0]
                    for member in (row[1] as String).split(separator: ",") {
                        try db.execute(sql: "DELETE FROM conflict_person WHERE person_id = ? AND conflict_id = ?", arguments: [String(member), id])
                    }
                    try db.execute(sql: "DELETE FROM conflict WHERE id = ?", arguments: [id])
                }
                try db.execute(sql: "UPDATE change SET cause = '' WHERE seq IN (SELECT seq FROM change_person WHERE person_id = ?)",
                               arguments: [person])
                try db.execute(sql: "UPDATE person SET state = 'erased', merged_into = NULL WHERE id = ?", arguments: [person])
            }
            // One change per `erasureChunk` absorbed persons: a person who had absorbed 100,000s
            // of others made one change larger than a message may be, and every follower stopped there.
            var seq: Int64 = 0
            for start in stride(from: 0, to: max(absorbed.count, 1), by: erasureChunk) {
                let chunk = Array(absorbed[start..<min(start + erasureChunk, absorbed.count)])
                seq = try Self.appendChange(db, .erase, target: survivor, sources: chunk, cause: Self.personErasedCause, atMs: nowMs)
            }
            truncation.owe()
            return (seq, removed)
        }
        try truncation.pay(pool)
        return result
    }

    /// Erases one identifier. One not stored (or no longer) is not found, and a truncation
    /// an earlier erasure still owes is made first: a retry completes an erasure whose
    /// truncation failed.
    public func erase(identifier: NormalizedIdentifier, nowMs: Int64) async throws -> (seq: Int64, removed: Int) {
        let stored = normalizer.storedValue(identifier)
        let result = try writing { db -> (Int64, Int)? in
            guard let owner = try String.fetchOne(db, sql: "SELECT person_id FROM identifier WHERE type = ? AND value = ?",
                                                  arguments: [identifier.type, stored]) else {
                return nil
            }
            try db.execute(sql: "DELETE FROM merge_member WHERE type = ? AND value = ?", arguments: [identifier.type, stored])
            try db.execute(sql: "DELETE FROM identifier WHERE type = ? AND value = ?", arguments: [identifier.type, stored])
            let seq = try Self.appendChange(db, .erase, target: owner, sources: [], cause: "identifier erased (\(identifier.type))", atMs: nowMs)
            truncation.owe()
            return (seq, 1)
        }
        try truncation.pay(pool)  // also when not found, if an earlier erasure's is still owed
        guard let result else { throw StoreError.identifierNotFound(identifier.type) }
        return result
    }

    // MARK: - Helpers (inside a transaction)

    /// Among persons matched by identifiers, the one matched by the highest-priority type;
    /// between equals, the one first in `oldestFirst` (the oldest).
    func bestPerson(_ matches: [(type: String, person: String)], oldestFirst: [String] = []) -> String? {
        let priority = normalizer.rules.priority
        func rank(_ match: (type: String, person: String)) -> (Int, Int) {
            (priority.firstIndex(of: match.type) ?? priority.count, oldestFirst.firstIndex(of: match.person) ?? oldestFirst.count)
        }
        return matches.min { rank($0) < rank($1) }?.person
    }

    static func owners(_ db: Database, _ values: [String], _ types: [String]) throws -> [(type: String, value: String, person: String)] {
        var result: [(String, String, String)] = []
        for (type, value) in zip(types, values) {
            if let person = try String.fetchOne(db.cachedStatement(sql: "SELECT person_id FROM identifier WHERE type = ? AND value = ?"),
                                                arguments: [type, value]) {
                result.append((type, value, person))
            }
        }
        return result
    }

    static func seq(_ db: Database, _ person: String) throws -> Int64 {
        try Int64.fetchOne(db.cachedStatement(sql: "SELECT seq FROM person WHERE id = ?"), arguments: [person]) ?? .max
    }

    /// Follows merges to the person that holds `id`'s identifiers now.
    static func survivor(_ db: Database, _ id: String) throws -> String {
        var current = id
        for _ in 0..<10_000 {
            guard let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT state, merged_into FROM person WHERE id = ?"), arguments: [current]) else {
                throw StoreError.personNotFound(id)
            }
            switch row["state"] as String {
            case "active": return current
            case "erased": throw StoreError.personErased(id)
            default: current = row["merged_into"]
            }
        }
        throw StoreError.personNotFound(id)
    }

    static func createPerson(_ db: Database, nowMs: Int64) throws -> String {
        var generator = SystemRandomNumberGenerator()
        let id = "p_" + (0..<12).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
        try db.cachedStatement(sql: "INSERT INTO person (id, created_at_ms, state) VALUES (?, ?, 'active')")
            .execute(arguments: [id, nowMs])
        return id
    }

    static func insertIdentifier(_ db: Database, _ type: String, _ value: String, person: String, atMs: Int64, source: String) throws {
        try db.cachedStatement(sql: """
            INSERT INTO identifier (type, value, person_id, first_seen_ms, last_seen_ms, source) VALUES (?, ?, ?, ?, ?, ?)
            """).execute(arguments: [type, value, person, atMs, atMs, source])
    }

    static func typeCounts(_ db: Database, _ persons: [String]) throws -> [String: Int] {
        var counts: [String: Int] = [:]
        for person in persons {
            for row in try Row.fetchAll(db.cachedStatement(sql: "SELECT type, COUNT(*) AS n FROM identifier WHERE person_id = ? GROUP BY type"),
                                        arguments: [person]) {
                counts[row["type"], default: 0] += row["n"] as Int
            }
        }
        return counts
    }

    static func typeCounts(_ db: Database, _ person: String) throws -> [String: Int] { try typeCounts(db, [person]) }

    /// The rule a merge of `persons` (plus new identifiers) would break, checked in priority order.
    static func mergeBlocker(_ db: Database, persons: [String], adding: [NormalizedIdentifier],
                             rules: IdentityRules) throws -> (rule: String, type: String)? {
        // An operator's split holds for the persons split and for whoever absorbed them since:
        // each side is a person with the persons merged into it.
        let apart = try db.cachedStatement(sql: """
            WITH x(id) AS (SELECT ?1 UNION ALL SELECT id FROM person WHERE merged_into = ?1),
                 y(id) AS (SELECT ?2 UNION ALL SELECT id FROM person WHERE merged_into = ?2)
            SELECT a, b FROM split WHERE (a IN x AND b IN y) OR (a IN y AND b IN x) LIMIT 1
            """)
        for (i, a) in persons.enumerated() {
            for b in persons[(i + 1)...] {
                if let row = try Row.fetchOne(apart, arguments: [a, b]) {
                    return ("unmerged by an operator: \(row[0] as String) and \(row[1] as String) stay apart", "")
                }
            }
        }
        var counts = try typeCounts(db, persons)
        for id in adding { counts[id.type, default: 0] += 1 }
        let ordered = rules.priority + rules.limits.keys.filter { !rules.priority.contains($0) }.sorted()
        for type in ordered {
            if let limit = rules.limits[type], counts[type, default: 0] > limit {
                return ("max \(limit) \(type) per person", type)
            }
        }
        return nil
    }

    static func merge(_ db: Database, source: String, into target: String, cause: String, atMs: Int64) throws {
        try db.execute(sql: "INSERT INTO merge (target, source, cause, at_ms) VALUES (?, ?, ?, ?)",
                       arguments: [target, source, cause, atMs])
        let mergeID = db.lastInsertedRowID
        try db.execute(sql: "INSERT INTO merge_member (merge_id, type, value) SELECT ?, type, value FROM identifier WHERE person_id = ?",
                       arguments: [mergeID, source])
        try db.execute(sql: "UPDATE identifier SET person_id = ? WHERE person_id = ?", arguments: [target, source])
        try db.execute(sql: "UPDATE person SET state = 'merged', merged_into = ? WHERE id = ?", arguments: [target, source])
        // Persons merged earlier into the source now point at the target directly.
        try db.execute(sql: "UPDATE person SET merged_into = ? WHERE merged_into = ?", arguments: [target, source])
        try appendChange(db, .merge, target: target, sources: [source], cause: cause, atMs: atMs, mergeID: mergeID)
    }

    /// Records a conflict, once per persons, rule and type (the same evidence replayed is not
    /// a new conflict), indexed by each of its persons for History.
    static func recordConflict(_ db: Database, persons: [String], rule: String, type: String, cause: String, atMs: Int64) throws {
        try db.execute(sql: """
            INSERT INTO conflict (person_ids, rule, identifier_type, cause, at_ms, after_seq)
            SELECT ?1, ?2, ?3, ?4, ?5, coalesce((SELECT max(seq) FROM change), 0) WHERE NOT EXISTS
              (SELECT 1 FROM conflict WHERE person_ids = ?1 AND rule = ?2 AND identifier_type = ?3)
            """, arguments: [persons.joined(separator: ","), rule, type, cause, atMs])
        guard db.changesCount > 0 else { return }
        let id = db.lastInsertedRowID
        for person in Set(persons) {
            try db.execute(sql: "INSERT OR IGNORE INTO conflict_person (person_id, conflict_id) VALUES (?, ?)", arguments: [person, id])
        }
    }

    /// The cause of a person's erasure in the change feed (an identifier's erasure, which
    /// leaves its person alive, says which identifier type).
    static let personErasedCause = "erased"

    /// Appends to the change feed. `seq` is the previous maximum plus one inside the write
    /// transaction (a rolled-back transaction leaves no hole), and at least the floor the
    /// store set when it opened: the time it started, in microseconds. So the numbers run
    /// consecutively while the service runs and jump ahead at each start, and a number is
    /// never given twice: after a backup is restored, or a power loss took the last commits
    /// (`synchronous = NORMAL`), the lost changes' numbers, which followers may already have
    /// passed, are not reused (a follower asks for changes after the last it applied, and
    /// would have skipped a new change under an old number). A clock set back across the
    /// restart by more than the service had run could still reuse one.
    @discardableResult
    static func appendChange(_ db: Database, _ kind: ChangeKind, target: String, sources: [String], cause: String,
                             atMs: Int64, mergeID: Int64 = 0) throws -> Int64 {
        let seq = try Int64.fetchOne(db.cachedStatement(sql: """
            SELECT max(coalesce((SELECT MAX(seq) FROM change), 0) + 1, (SELECT seq FROM feed_floor))
            """))!
        try db.execute(sql: "INSERT INTO change (seq, kind, target, sources, cause, at_ms, merge_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       arguments: [seq, kind.rawValue, target, sources.joined(separator: ","), cause, atMs, mergeID])
        for person in Set([target] + sources) where !person.isEmpty {
            try db.execute(sql: "INSERT OR IGNORE INTO change_person (person_id, seq) VALUES (?, ?)", arguments: [person, seq])
        }
        return seq
    }

    static func fetchChanges(_ db: Database, sql: String, arguments: StatementArguments) throws -> [ChangeRecord] {
        try Row.fetchAll(db, sql: sql, arguments: arguments).map { row in
            ChangeRecord(seq: row["seq"], kind: ChangeKind(rawValue: row["kind"]) ?? .merge, target: row["target"],
                         sources: (row["sources"] as String).split(separator: ",").map(String.init),
                         cause: row["cause"], atMs: row["at_ms"], mergeID: row["merge_id"])
        }
    }
}
