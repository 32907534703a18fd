import ServiceRuntime

/// arbiter-routing: serves health until its service lands.
enum RoutingDefinition: ServiceDefinition {
    static let commandName = "arbiter-routing"
    static let abstract = "Arbiter routing service: Delivers on the right channel."
    static let defaultPort = 7104
    static let defaultAdminPort = 8104
    static func makeServices(_ context: ServiceContext) async throws -> ServiceParts { ServiceParts() }
}

await ServiceCommand<RoutingDefinition>.start()
