import Logging
import ServiceLifecycle

/// Keeps a store to its retention: every `interval` it deletes what is older than
/// `retentionDays` through `prune`, `batch` rows per call (per transaction), so that the
/// store's other writes go on in between. Used for the decision log
/// (`decision.logRetentionDays`) and routing's outbox (`routing.outboxRetentionDays`).
public struct RetentionPruner: Service {
    /// What is pruned, for the log ("decision log", "outbox").
    let name: String
    let retentionMs: Int64
    let interval: Duration
    let batch: Int
    let logger: Logger
    let clock: @Sendable () -> Int64
    let prune: @Sendable (_ beforeMs: Int64, _ limit: Int) throws -> (deleted: Int, more: Bool)

    /// - Parameter prune: deletes up to about `limit` rows of what is older than `beforeMs`
    ///   (Unix ms) and returns how many went and whether more may be left; it is called again
    ///   while they may.
    public init(_ name: String, retentionDays: Int, interval: Duration = .seconds(60), batch: Int = 1000,
                logger: Logger, clock: @escaping @Sendable () -> Int64,
                prune: @escaping @Sendable (_ beforeMs: Int64, _ limit: Int) throws -> (deleted: Int, more: Bool)) {
        self.name = name
        retentionMs = Int64(retentionDays) * 86_400_000
        self.interval = interval
        self.batch = batch
        self.logger = logger
        self.clock = clock
        self.prune = prune
    }

    public func run() async throws {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            await pruneOnce()
            // Woken by a graceful shutdown, which would otherwise wait out the interval (and
            // the whole grace period with it).
            try? await cancelWhenGracefulShutdown { [interval] in try await Task.sleep(for: interval) }
        }
    }

    /// Deletes everything older than the retention; returns how many rows went.
    @discardableResult
    public func pruneOnce() async -> Int {
        var total = 0
        do {
            while !Task.isShuttingDownGracefully {
                let (deleted, more) = try prune(clock() - retentionMs, batch)
                total += deleted
                guard more else { break }
                await Task.yield()
            }
        } catch {
            logger.error("pruning the \(name) failed (the next round tries again): \(error)")
        }
        if total > 0 { logger.info("pruned \(total) rows of the \(name) older than \(retentionMs / 86_400_000) days") }
        return total
    }
}
