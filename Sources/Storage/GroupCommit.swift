import Dispatch
import Synchronization

/// Group commit for a SQLite store's hot write path: callers submit entries; one writer
/// thread takes everything waiting (up to `maxBatch`) and writes it with `write` in one
/// transaction; each caller resumes once the transaction holding its entry has committed,
/// with its own output. Under load, one fsync-bearing commit serves hundreds of writes;
/// alone, an entry is written at once.
///
/// The store that owns it passes its write function with every entry (a store cannot hand
/// a closure over itself to a property during its own `init`); a batch is written with the
/// function of the caller that found the writer idle, so every caller passes the same one.
public final class GroupCommit<Entry: Sendable, Output: Sendable>: Sendable {
    /// Writes a batch in one transaction; returns one output per entry, in order.
    public typealias Write = @Sendable ([Entry]) throws -> [Output]

    private let queue = Mutex<(waiting: [(Entry, CheckedContinuation<Output, any Error>)], writing: Bool)>(([], false))
    private let writer: DispatchQueue
    private let maxBatch: Int

    public init(label: String, maxBatch: Int = 512) {
        writer = DispatchQueue(label: label)
        self.maxBatch = max(1, maxBatch)
    }

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

    private func drain(_ write: Write) {
        while true {
            let batch = queue.withLock { queue -> [(Entry, CheckedContinuation<Output, any Error>)] in
                let batch = Array(queue.waiting.prefix(maxBatch))
                queue.waiting.removeFirst(batch.count)
                if batch.isEmpty { queue.writing = false }
                return batch
            }
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
