import ServiceRuntime

/// arbiter-profile: serves health until its service lands.
enum ProfileDefinition: ServiceDefinition {
    static let commandName = "arbiter-profile"
    static let abstract = "Arbiter profile service: Events and traits into one profile."
    static let defaultPort = 7102
    static let defaultAdminPort = 8102
    static func makeServices(_ context: ServiceContext) async throws -> ServiceParts { ServiceParts() }
}

await ServiceCommand<ProfileDefinition>.start()
