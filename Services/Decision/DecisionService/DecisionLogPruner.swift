import Logging
import ServiceLifecycle

/// Keeps the decision log to `decision.logRetentionDays`: every `interval` it deletes the
/// older decisions with their offers and outcomes (`DecisionStore.pruneLog`), `batch` rows
/// per transaction so that Decide's log writes go on in between.
public struct DecisionLogPruner: Service {
    let store: DecisionStore
    let retentionMs: Int64
    let interval: Duration
    let batch: Int
    let logger: Logger
    let clock: @Sendable () -> Int64

    public init(store: DecisionStore, retentionDays: Int, interval: Duration = .seconds(60), batch: Int = 1000,
                logger: Logger, clock: @escaping @Sendable () -> Int64) {
        self.store = store
        retentionMs = Int64(retentionDays) * 86_400_000
        self.interval = interval
        self.batch = batch
        self.logger = logger
        self.clock = clock
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
    func pruneOnce() async -> Int {
        var total = 0
        do {
            while !Task.isShuttingDownGracefully {
                let deleted = try store.pruneLog(beforeMs: clock() - retentionMs, limit: batch)
                total += deleted
                guard deleted >= batch else { break }
                await Task.yield()
            }
        } catch {
            logger.error("decision: pruning the log failed (the next round tries again): \(error)")
        }
        if total > 0 { logger.info("decision: pruned \(total) log rows older than \(retentionMs / 86_400_000) days") }
        return total
    }
}
