import Dispatch
import Foundation
@testable import Storage
import Synchronization
import Testing
import TestSupport

@Suite("SQLite stores: group commit")
struct GroupCommitTests {
    /// A write function that records its batches; a batch of just "gate" waits for `gate`.
    final class Writes: Sendable {
        let batches = Mutex<[[String]]>([])
        let gateReached = Mutex(false)
        let gate = DispatchSemaphore(value: 0)

        var write: GroupCommit<String, String>.Write {
            { entries in
                if entries == ["gate"] {
                    self.gateReached.withLock { $0 = true }
                    self.gate.wait()
                }
                self.batches.withLock { $0.append(entries) }
                return entries.map { $0.uppercased() }
            }
        }

        /// Two entries queue while the writer is busy with a first: they are written together.
        func batchOfTwo(_ commit: GroupCommit<String, String>) async throws {
            async let gate = commit.submit("gate", write: write)
            try await waitFor { self.gateReached.withLock { $0 } }
            async let a = commit.submit("a", write: write)
            async let b = commit.submit("b", write: write)
            try await waitFor { commit.waitingCount == 2 }
            self.gate.signal()
            #expect(try await [gate, a, b] == ["GATE", "A", "B"])
            // "a" and "b" are submitted by two child tasks: either may queue first.
            #expect(batches.withLock { $0 }.map { Set($0) } == [["gate"], ["a", "b"]])
        }
    }

    @Test("after a batch of several entries, entries arriving within the commit interval share one batch; one caller at a time does not wait")
    func commitIntervalTimed() async throws {
        let interval = 1500  // milliseconds
        let commit = GroupCommit<String, String>(label: "arbiter.test.group-commit", commitInterval: .milliseconds(interval))
        let writes = Writes()
        try await writes.batchOfTwo(commit)

        // That batch held two: "c" waits out the interval, and "d", submitted meanwhile,
        // joins it.
        async let c = commit.submit("c", write: writes.write)
        try await waitFor { commit.waitingCount == 1 }
        async let d = commit.submit("d", write: writes.write)
        #expect(try await [c, d] == ["C", "D"])
        let batches = writes.batches.withLock { $0 }
        #expect(batches.count == 3 && batches.last == ["c", "d"], "\(batches)")

        // One caller at a time: "e" follows a batch of two (it may wait), "f" a batch of one
        // (it does not).
        #expect(try await commit.submit("e", write: writes.write) == "E")
        let start = ContinuousClock.now
        #expect(try await commit.submit("f", write: writes.write) == "F")
        #expect(ContinuousClock.now - start < .milliseconds(interval / 2), "a lone entry after a batch of one waited for the interval")
        #expect(writes.batches.withLock { $0 }.suffix(2) == [["e"], ["f"]])
    }

    @Test("without a commit interval, an entry submitted while the writer is idle is written at once")
    func noIntervalTimed() async throws {
        let commit = GroupCommit<String, String>(label: "arbiter.test.group-commit")
        let writes = Writes()
        try await writes.batchOfTwo(commit)
        let start = ContinuousClock.now
        #expect(try await commit.submit("c", write: writes.write) == "C")
        #expect(ContinuousClock.now - start < .milliseconds(750), "an entry waited with no commit interval")
        // The batch of "a" and "b" may hold them in either order (see batchOfTwo).
        #expect(writes.batches.withLock { $0 }.map { Set($0) } == [["gate"], ["a", "b"], ["c"]])
    }
}
