import Foundation
import IdentityFeed
import ProfileService
import RPC
import ServiceRuntime

/// arbiter-profile: events and traits into one profile (see ProfileService).
enum ProfileDefinition: ServiceDefinition {
    static let commandName = "arbiter-profile"
    static let abstract = "Arbiter profile service: events and traits into one profile, with windowed and decayed features, segments and consent."
    static let defaultPort = 7102
    static let defaultAdminPort = 8102
    /// The store reads and writes SQLite synchronously: keep that off the event loops.
    static let handlerExecution = RPCServerConfiguration.HandlerExecution.concurrentPool

    static func makeServices(_ context: ServiceContext) async throws -> ServiceParts {
        let configuration = try context.section("profile", as: ProfileConfiguration.self, default: .init())
        let store = try ProfileStore(directory: context.dataDirectory, flushThreshold: configuration.stateFlushPersons,
                                     cachePersons: configuration.stateCachePersons, cacheBytes: configuration.stateCacheBytes,
                                     factsPersons: configuration.factsCachePersons, factsBytes: configuration.factsCacheBytes,
                                     logger: context.logger)
        let clock: @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970 * 1000) }
        let service = ProfileService(store: store, identity: context.identity, clock: clock)
        let settler = ProfileStoreSettler(store: store, logger: context.logger)
        // An Erase (or the feed's erasure) whose settle failed is tried again every second.
        let retrier = store.settleRetrier(logger: context.logger)
        guard let identity = context.identity else {
            context.logger.warning("no --identity: requests must name persons by person_id, and merges are not followed")
            return ServiceParts(rpcServices: [service], background: [settler, retrier])
        }
        let follower = IdentityFeedFollower(store: store, identity: identity, logger: context.logger, clock: clock)
        // The settler first: background work stops in reverse order, so it runs after the follower.
        return ServiceParts(rpcServices: [service], background: [settler, retrier, follower])
    }
}

await ServiceCommand<ProfileDefinition>.start()
