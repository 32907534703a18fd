import EchoService
import ServiceRuntime

/// arbiter-echo: the conformance server for client authors (grpc.health.v1.Health and arbiter.echo.v1.Echo).
enum EchoDefinition: ServiceDefinition {
    static let commandName = "arbiter-echo"
    static let abstract = "Arbiter conformance server: echoes metadata, deadlines and status codes for client authors."
    static let defaultPort = 7100
    static let defaultAdminPort = 8100
    static func makeServices(_ context: ServiceContext) async throws -> ServiceParts {
        ServiceParts(rpcServices: [EchoService()])
    }
}

await ServiceCommand<EchoDefinition>.start()
