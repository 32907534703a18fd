import DecisionService
import Foundation
import IdentityFeed
import RPC
import ServiceRuntime

/// arbiter-decision: next-best action (see DecisionService).
enum DecisionDefinition: ServiceDefinition {
    static let commandName = "arbiter-decision"
    static let abstract = "Arbiter decision service: next-best action with eligibility, contact policy, arbitration, online learning and a degraded mode."
    static let defaultPort = 7103
    static let defaultAdminPort = 8103
    /// Most methods read or write SQLite synchronously: keep them off the event loop.
    /// Decide and ReportOutcome ask for the loop themselves (DecisionService.register).
    static let handlerExecution = RPCServerConfiguration.HandlerExecution.concurrentPool

    static func makeServices(_ context: ServiceContext) async throws -> ServiceParts {
        let configuration = try context.section("decision", as: DecisionConfiguration.self, default: .init())
        let store = try DecisionStore(directory: context.dataDirectory, for: configuration)
        if context.profile == nil {
            context.logger.warning("no --profile: every decision is degraded (no traits, features, segments or consent)")
        }
        if context.routing == nil {
            context.logger.warning("no --routing: Decide with deliver answers FAILED_PRECONDITION")
        }
        let service = DecisionService(store: store, configuration: configuration, identity: context.identity, profile: context.profile,
                                      routing: context.routing)
        // An erasure from the feed whose WAL truncation failed is tried again every second.
        var parts = ServiceParts(rpcServices: [service], background: [store.truncationRetrier(logger: context.logger)])
        if configuration.logRetentionDays > 0 {
            let conflicts = service.windowsBeyondRetention()
            guard conflicts.isEmpty else {
                throw context.configurationError("decision.logRetentionDays \(configuration.logRetentionDays) is shorter than windows in the catalog, which would count deleted offers: \(conflicts.joined(separator: "; "))")
            }
            parts.background.append(store.pruner(retentionDays: configuration.logRetentionDays, logger: context.logger,
                                                 clock: { Int64(Date().timeIntervalSince1970 * 1000) }))
        }
        if let identity = context.identity {
            // Merges and erasures of persons apply to their decisions, offers and outcomes.
            parts.background.append(IdentityFeedFollower(store: store, identity: identity, logger: context.logger,
                                                         clock: { Int64(Date().timeIntervalSince1970 * 1000) }))
        }
        return parts
    }
}

await ServiceCommand<DecisionDefinition>.start()
