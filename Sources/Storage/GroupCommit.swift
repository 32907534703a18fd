import Dispatch
import Synchronization

/// Group commit for a SQLite store's hot write path: callers submit entries; one writer
/// thread takes everything waiting (up to `maxBatch`) and writes it with `write` in one
/// transaction; each caller resumes once the transaction holding its entry has committed,
/// with its own output. Under load, one fsync-bearing commit serves hundreds of writes;
/// alone, an entry is written at once.
///
/// Under concurrent load a commit interval makes batches larger: the writer starts a
/// transaction at most once per `commitInterval`, so fewer transactions write the pages
/// every transaction rewrites (the header page, the tables' last leaves). It waits only
/// after a batch of more than one entry: one caller at a time is written at once.
///
/// The store that owns it passes its write function with every entry (a store cannot hand
/// a closure over itself to a property during its own `init`); a batch is written with the
/// function of the caller that found the writer idle, so every caller passes the same one.
public final class GroupCommit<Entry: Sendable, Output: Sendable>: Sendable {
    /// Writes a batch in one transaction; returns one output per entry, in order.
    public typealias Write = @Sendable ([Entry]) throws -> [Output]

    private struct State {
        var waiting: [(Entry, CheckedContinuation<Output, any Error>)] = []
        var writing = false
        /// When the last batch began to be written, and how many entries it held.
        var lastStart = DispatchTime(uptimeNanoseconds: 0)
        var lastBatch = 0
    }

    private let queue = Mutex(State())
    private let writer: DispatchQueue
    private let maxBatch: Int
    private let commitInterval: DispatchTimeInterval

    /// - Parameters:
    ///   - maxBatch: the most entries one transaction writes.
    ///   - commitInterval: after a batch of more than one entry, the next batch begins no
    ///     sooner than this after it began. Zero (the default) writes as soon as the writer
    ///     is free.
    public init(label: String, maxBatch: Int = 512, commitInterval: DispatchTimeInterval = .nanoseconds(0)) {
        writer = DispatchQueue(label: label)
        self.maxBatch = max(1, maxBatch)
        self.commitInterval = commitInterval
    }

    /// Entries submitted and not yet taken into a batch (tests wait on it).
    var waitingCount: Int { queue.withLock { $0.waiting.count } }

    /// Returns `entry`'s output once it is committed; throws what the batch's write threw.
    public func submit(_ entry: Entry, write: @escaping Write) async throws -> Output {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Output, any Error>) in
            let start = queue.withLock { queue in
                queue.waiting.append((entry, continuation))
                guard !queue.writing else { return false }
                queue.writing = true
                return true
            }
            if start { writer.async { self.drain(write) } }
        }
    }

    private func drain(_ write: @escaping Write) {
        while true {
            let now = DispatchTime.now()
            let next = queue.withLock { queue -> (batch: [(Entry, CheckedContinuation<Output, any Error>)], resumeAt: DispatchTime?) in
                guard !queue.waiting.isEmpty else {
                    queue.writing = false
                    return ([], nil)
                }
                if queue.lastBatch > 1, now < queue.lastStart + commitInterval {
                    return ([], queue.lastStart + commitInterval)
                }
                let batch = Array(queue.waiting.prefix(maxBatch))
                queue.waiting.removeFirst(batch.count)
                queue.lastStart = now
                queue.lastBatch = batch.count
                return (batch, nil)
            }
            if let resumeAt = next.resumeAt {
                // Still `writing`: entries submitted meanwhile join the batch this resumes.
                writer.asyncAfter(deadline: resumeAt) { self.drain(write) }
                return
            }
            let batch = next.batch
            guard !batch.isEmpty else { return }
            do {
                let outputs = try write(batch.map { $0.0 })
                precondition(outputs.count == batch.count, "GroupCommit: write returned \(outputs.count) outputs for \(batch.count) entries")
                for ((_, continuation), output) in zip(batch, outputs) { continuation.resume(returning: output) }
            } catch {
                for (_, continuation) in batch { continuation.resume(throwing: error) }
            }
        }
    }
}
