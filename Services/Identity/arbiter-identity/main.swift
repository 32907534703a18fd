import Foundation
import IdentityService
import RPC
import ServiceRuntime

/// arbiter-identity: stitches identifiers into one person (see IdentityService).
enum IdentityDefinition: ServiceDefinition {
    static let commandName = "arbiter-identity"
    static let abstract = "Arbiter identity service: stitches identifiers into one person, with merge rules, unmerge, audit and a change feed."
    static let defaultPort = 7101
    static let defaultAdminPort = 8101
    /// The store reads and writes SQLite synchronously: keep that off the event loops.
    static let handlerExecution = RPCServerConfiguration.HandlerExecution.concurrentPool

    static func makeServices(_ context: ServiceContext) async throws -> ServiceParts {
        let rules = try context.section("identity", as: IdentityRules.self, default: IdentityRules())
        do { try rules.validate() } catch { throw ConfigurationError("--config: \(error)") }
        var key: [UInt8]?
        if let file = rules.privacyKeyFile {
            guard let data = FileManager.default.contents(atPath: file), data.count >= 16 else {
                throw ConfigurationError("--config: identity.privacy_key_file: cannot read at least 16 bytes from \(file)")
            }
            key = Array(data)
        }
        let store: IdentityStore
        do {
            store = try IdentityStore(directory: context.dataDirectory, normalizer: Normalizer(rules: rules, privacyKey: key))
        } catch let mismatch as IdentityStore.PrivacyKeyMismatch {
            throw ConfigurationError("--config: identity.privacy_key_file: \(mismatch)")
        }
        // An Erase whose WAL truncation failed is tried again every second.
        let retrier = store.truncationRetrier(logger: context.logger)
        return ServiceParts(rpcServices: [IdentityService(store: store)], background: [retrier])
    }
}

await ServiceCommand<IdentityDefinition>.start()
