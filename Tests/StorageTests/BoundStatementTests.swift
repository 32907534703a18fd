import Foundation
import GRDB
import Storage
import Testing
import TestSupport

@Suite("SQLite stores: Statement.run, the hot paths' insert")
struct BoundStatementTests {
    static func store() throws -> DatabasePool {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            for table in ["t", "grdb"] {
                try db.execute(sql: "CREATE TABLE \(table) (id TEXT PRIMARY KEY, n INTEGER, x REAL, body BLOB, raw BLOB, note TEXT) WITHOUT ROWID")
            }
        }
        return try SQLiteStore.open(directory: temporaryDirectory("bound"), name: "t", migrator: migrator)
    }

    @Test("every kind of value is stored byte for byte as GRDB stores it (text non-ASCII, or with a NUL, which ends it for both), integers, reals, blobs, NULL")
    func values() async throws {
        let pool = try Self.store()
        let id = "a\u{0}b é 😀"
        try await pool.write { db in
            let insert = try db.cachedStatement(sql: "INSERT INTO t (id, n, x, body, raw, note) VALUES (?, ?, ?, ?, ?, ?)")
            try insert.run(db, .text(id), .integer(.min), .real(-2.5), .blob(Data([0, 1, 255])), .blob(Data()), .null)
            try insert.run(db, .text("second"), .integer(.max), .real(.infinity), .blob(Data()), .blob(Data([7])), .text(""))
        }
        try await pool.write { db in
            let insert = "INSERT INTO grdb (id, n, x, body, raw, note) VALUES (?, ?, ?, ?, ?, ?)"
            try db.execute(sql: insert, arguments: [id, Int64.min, -2.5, Data([0, 1, 255]), Data(), nil])
            try db.execute(sql: insert, arguments: ["second", Int64.max, Double.infinity, Data(), Data([7]), ""])
        }
        let stored = { (table: String) in
            try await pool.read { db in
                try Row.fetchAll(db, sql: "SELECT hex(id), n, x, hex(body), hex(raw), quote(note) FROM \(table) ORDER BY n").map { $0.description }
            }
        }
        #expect(try await stored("t") == stored("grdb"))
        let rows = try await pool.read { db in try Row.fetchAll(db, sql: "SELECT * FROM t ORDER BY n") }
        #expect(rows.count == 2)
        #expect(rows[0]["id"] as String == "a")  // up to the NUL, as GRDB binds a String
        #expect(rows[0]["n"] as Int64 == .min)
        #expect(rows[0]["x"] as Double == -2.5)
        #expect(rows[0]["body"] as Data == Data([0, 1, 255]))
        #expect((rows[0]["note"] as DatabaseValue).isNull)
        #expect(rows[1]["n"] as Int64 == .max)
        #expect(rows[1]["x"] as Double == .infinity)
        #expect(rows[1]["raw"] as Data == Data([7]))
        #expect(rows[1]["note"] as String == "")
        // Found by a query whose arguments GRDB binds.
        let found = try await pool.read { db in
            try Int.fetchOne(db, sql: "SELECT count(*) FROM t WHERE id = ? AND body = ?", arguments: [id, Data([0, 1, 255])])
        }
        #expect(found == 1)
    }

    @Test("a constraint error is GRDB's DatabaseError, the transaction can go on, and the statement runs again; changesCount tells an ignored insert")
    func errors() async throws {
        let pool = try Self.store()
        try await pool.write { db in
            let insert = try db.cachedStatement(sql: "INSERT INTO t (id, n) VALUES (?, ?)")
            try insert.run(db, .text("k"), .integer(1))
            #expect(throws: DatabaseError.self) { try insert.run(db, .text("k"), .integer(2)) }
            do {
                try insert.run(db, .text("k"), .integer(3))
            } catch let error as DatabaseError {
                #expect(error.resultCode == .SQLITE_CONSTRAINT)
                #expect(error.message?.contains("UNIQUE") == true)
            }
            try insert.run(db, .text("l"), .integer(4))
            let ignore = try db.cachedStatement(sql: "INSERT OR IGNORE INTO t (id, n) VALUES (?, ?)")
            try ignore.run(db, .text("l"), .integer(5))
            #expect(db.changesCount == 0)
            try ignore.run(db, .text("m"), .integer(6))
            #expect(db.changesCount == 1)
            // A statement that returns rows is refused rather than half-run.
            let select = try db.cachedStatement(sql: "SELECT n FROM t WHERE id = ?")
            #expect(throws: DatabaseError.self) { try select.run(db, .text("k")) }
            #expect(try Int.fetchOne(select, arguments: ["k"]) == 1)
        }
        let ids = try await pool.read { db in try String.fetchAll(db, sql: "SELECT id FROM t ORDER BY id") }
        #expect(ids == ["k", "l", "m"])
    }
}
