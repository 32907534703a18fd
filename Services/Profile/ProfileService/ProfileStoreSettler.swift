import Logging
import ServiceLifecycle

/// Settles the profile store (`ProfileStore.settle`) when the service shuts down gracefully.
/// Run it as background work: those stop after the RPC server has drained, so no Track
/// dirties a state after it, and the next start has no feature state to recompute.
public struct ProfileStoreSettler: Service {
    let store: ProfileStore
    let logger: Logger

    public init(store: ProfileStore, logger: Logger) {
        self.store = store
        self.logger = logger
    }

    public func run() async throws {
        try? await gracefulShutdown()
        do {
            try store.settle()
        } catch {
            // Nothing is lost: the logged persons are recomputed from their events at start.
            logger.error("profile: writing the feature states at shutdown failed: \(error)")
        }
    }
}
