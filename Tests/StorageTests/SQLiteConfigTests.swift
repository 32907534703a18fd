import GRDB
import GRDBSQLite
import Storage
import Testing
import TestSupport

@Suite("SQLite stores: the process's SQLite configuration")
struct SQLiteConfigTests {
    @Test("SQLite keeps no allocation statistics, so its allocations share no lock across connections")
    func noAllocationStatistics() async throws {
        // Set as the process loaded, before any connection: SQLite accepted it.
        #expect(SQLiteStore.allocationStatisticsOff)
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in try db.execute(sql: "CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)") }
        let pool = try SQLiteStore.open(directory: temporaryDirectory("sqlite-config"), name: "t", migrator: migrator)
        try await pool.write { db in
            for i in 0..<100 { try db.execute(sql: "INSERT INTO t (id, body) VALUES (?, ?)", arguments: [i, String(repeating: "x", count: 500)]) }
        }
        #expect(try await pool.read { db in try Int.fetchOne(db, sql: "SELECT count(*) FROM t") } == 100)
        // With statistics on (SQLite's default) an open pool with a page cache in use counts
        // its memory here; with them off SQLite counts nothing.
        #expect(sqlite3_memory_used() == 0)
    }
}
