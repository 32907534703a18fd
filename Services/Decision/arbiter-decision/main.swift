import ServiceRuntime

/// arbiter-decision: serves health until its service lands.
enum DecisionDefinition: ServiceDefinition {
    static let commandName = "arbiter-decision"
    static let abstract = "Arbiter decision service: Next-best action."
    static let defaultPort = 7103
    static let defaultAdminPort = 8103
    static func makeServices(_ context: ServiceContext) async throws -> ServiceParts { ServiceParts() }
}

await ServiceCommand<DecisionDefinition>.start()
