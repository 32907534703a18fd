import Foundation
import GRDB
import Logging
import Storage
import Synchronization
import Testing
import TestSupport

@Suite("SQLite stores: the WAL truncation an erasure owes")
struct OwedTruncationTests {
    @Test("an erasure owed while a truncation runs stays owed; a failed truncation stays owed")
    func countsWhatItPaid() throws {
        struct Busy: Error {}
        let truncation = OwedTruncation(owed: false)
        var runs = 0
        try truncation.pay { runs += 1 }
        #expect(runs == 0 && !truncation.isOwed)  // nothing owed: nothing run

        truncation.owe()
        #expect(throws: Busy.self) { try truncation.pay { throw Busy() } }
        #expect(truncation.isOwed)
        // Another erasure commits while this truncation runs: the truncation may have begun
        // before its rows were deleted, so it pays only what was owed when it began. (Before,
        // the profile store's flag was cleared by whichever settle ended last.)
        try truncation.pay { truncation.owe() }
        #expect(truncation.isOwed)
        try truncation.pay { runs += 1 }
        #expect(runs == 1 && !truncation.isOwed)
        #expect(OwedTruncation().isOwed)  // a new store owes one, for a crash after an erasure
    }

    @Test("the retrier truncates the WAL once the reader that kept it busy lets go, with no other call")
    func retrierPays() async throws {
        let directory = temporaryDirectory("owed-truncation")
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in try db.execute(sql: "CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)") }
        let pool = try SQLiteStore.open(directory: directory, name: "t", migrator: migrator)
        let marker = "ocelot\(UInt32.random(in: 0...UInt32.max))"
        try await pool.write { db in try db.execute(sql: "INSERT INTO t (id, body) VALUES (1, ?)", arguments: [marker]) }
        try SQLiteStore.checkpoint(pool)
        let release = try await holdReadSnapshot(pool.path)
        // The erasure: its row deleted past the reader's snapshot, and the truncation fails.
        try await pool.write { db in try db.execute(sql: "DELETE FROM t WHERE id = 1") }
        let truncation = OwedTruncation(owed: false)
        truncation.owe()
        #expect(throws: DatabaseError.self) { try truncation.pay(pool, patience: .zero) }
        let attempts = Atomic<Int>(0)
        let retrier = OwedTruncation.Retrier(truncation, interval: .milliseconds(20), logger: Logger(label: "test")) {
            attempts.add(1, ordering: .relaxed)
            try SQLiteStore.checkpoint(pool, patience: .zero)
        }
        let running = Task { try await retrier.run() }
        defer { running.cancel() }
        #expect(try await eventually { attempts.load(ordering: .relaxed) >= 3 })
        #expect(truncation.isOwed, "paid while the reader held its snapshot")
        release()
        #expect(try await eventually { !truncation.isOwed })
        #expect(!filesContain(marker, in: directory, files: ["t.sqlite", "t.sqlite-wal"]))
        let paid = attempts.load(ordering: .relaxed)
        try await Task.sleep(for: .milliseconds(100))
        #expect(attempts.load(ordering: .relaxed) == paid, "tried again with nothing owed")
    }

    @Test("the retrier skips its turns while another pay runs (an Erase's), instead of queueing behind it")
    func retrierSkipsWhilePaying() async throws {
        let truncation = OwedTruncation()
        let attempts = Atomic<Int>(0)
        let retrier = OwedTruncation.Retrier(truncation, interval: .milliseconds(20), logger: Logger(label: "test")) {
            attempts.add(1, ordering: .relaxed)
        }
        // An Erase's truncation, held on a thread of its own as a reader would hold it.
        let release = try holdOnThread { done in try truncation.pay { done() } }
        let running = Task { try await retrier.run() }
        defer { running.cancel() }
        try await Task.sleep(for: .milliseconds(200))
        #expect(attempts.load(ordering: .relaxed) == 0)
        release()
        #expect(!truncation.isOwed)  // the Erase's pay paid it
        truncation.owe()
        #expect(try await eventually { !truncation.isOwed })
        #expect(attempts.load(ordering: .relaxed) == 1)
    }
}
