import Foundation
import IdentityFeed
import RoutingService
import RPC
import ServiceRuntime

/// arbiter-routing: delivers on the right channel at the right time (see RoutingService).
enum RoutingDefinition: ServiceDefinition {
    static let commandName = "arbiter-routing"
    static let abstract = "Arbiter routing service: consent, reachability, channel preference, quiet hours, send time, caps and a durable outbox."
    static let defaultPort = 7104
    static let defaultAdminPort = 8104
    /// The store reads and writes SQLite synchronously: keep that off the event loops.
    static let handlerExecution = RPCServerConfiguration.HandlerExecution.concurrentPool

    static func makeServices(_ context: ServiceContext) async throws -> ServiceParts {
        let configuration = try context.section("routing", as: RoutingConfiguration.self, default: .init())
        let store = try RoutingStore(directory: context.dataDirectory, configuration: configuration)
        if context.profile == nil {
            context.logger.warning("no --profile: Route answers UNAVAILABLE (consent cannot be checked); the outbox is still sent")
        }
        if configuration.webhook == nil && configuration.smtp == nil {
            context.logger.warning("no webhook or smtp in the routing configuration: every channel is unreachable")
        }
        let service: RoutingService
        do {
            service = try RoutingService(store: store, configuration: configuration, profile: context.profile, group: context.group, logger: context.logger)
        } catch {
            throw ConfigurationError("--config: routing.\(error)")
        }
        // An erasure from the feed whose WAL truncation failed is tried again every second.
        var background = service.background + [store.truncationRetrier(logger: context.logger)]
        if let identity = context.identity {
            background.append(IdentityFeedFollower(store: store, identity: identity, logger: context.logger,
                                                   clock: { Int64(Date().timeIntervalSince1970 * 1000) }))
        }
        return ServiceParts(rpcServices: [service], background: background)
    }
}

await ServiceCommand<RoutingDefinition>.start()
