import ServiceRuntime

/// arbiter-identity: serves health until its service lands.
enum IdentityDefinition: ServiceDefinition {
    static let commandName = "arbiter-identity"
    static let abstract = "Arbiter identity service: Stitches identifiers into one person."
    static let defaultPort = 7101
    static let defaultAdminPort = 8101
    static func makeServices(_ context: ServiceContext) async throws -> ServiceParts { ServiceParts() }
}

await ServiceCommand<IdentityDefinition>.start()
