import ArgumentParser
import Contracts
import Foundation
import RPC

/// The services `arbiter call` and `arbiter list` know, with their default ports.
enum Catalog {
    static let services: [(name: String, port: Int, methods: [any AnyMethodDescriptor])] = [
        ("arbiter.identity.v1.Identity", 7101, IdentityV1.Identity.methods),
        ("arbiter.profile.v1.Profile", 7102, ProfileV1.Profile.methods),
        ("arbiter.decision.v1.Decision", 7103, DecisionV1.Decision.methods),
        ("arbiter.routing.v1.Routing", 7104, RoutingV1.Routing.methods),
        ("arbiter.echo.v1.Echo", 7100, EchoV1.Echo.methods),
        ("grpc.health.v1.Health", 7100, HealthV1.Health.methods),
    ]

    /// `arbiter.routing.v1.Routing/Route`, `Routing/Route` or `routing/Route`.
    static func method(_ name: String) throws -> (method: any AnyMethodDescriptor, port: Int) {
        let parts = name.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
            throw ValidationError("method must be SERVICE/METHOD, e.g. Routing/Route or arbiter.routing.v1.Routing/Route")
        }
        let service = parts[0].lowercased(), method = String(parts[1])
        for entry in services where entry.name.lowercased() == service || entry.name.split(separator: ".").last!.lowercased() == service {
            guard let found = entry.methods.first(where: { $0.method.lowercased() == method.lowercased() }) else {
                throw ValidationError("\(entry.name) has no method \(method); it has \(entry.methods.map(\.method).joined(separator: ", "))")
            }
            return (found, entry.port)
        }
        throw ValidationError("unknown service \(parts[0]); `arbiter list` shows them")
    }
}

/// `arbiter call SERVICE/METHOD '{json}'`: JSON in, the protobuf request over ttrpc, JSON out.
struct Call: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Call a method with a JSON request; print the JSON response (proto3 JSON mapping).",
        discussion: """
            Examples:
              arbiter call Identity/Resolve '{"identifiers": [{"type": "email", "value": "ada@example.com"}], "createIfMissing": true}'
              arbiter call Decision/Decide '{"person": {"personId": "p_…"}, "placement": "home", "explain": true}'
            Field names in lowerCamelCase (or as in the .proto), enums by name, int64 as strings or numbers,
            bytes as base64. On an error status the code and message go to standard error, exit status 1.
            """)

    @Argument(help: "SERVICE/METHOD, e.g. Routing/Route (`arbiter list` shows them all).") var method: String
    @Argument(help: "The request as JSON (default {}); - reads it from standard input.") var request = "{}"
    @Option(help: "host:port (default 127.0.0.1 and the service's default port).") var address: String?
    @Option(help: "Deadline in seconds.") var timeout = 10.0
    @Option(name: [.customShort("H"), .customLong("header")], help: "Metadata key=value (repeatable).") var headers: [String] = []
    @Option(help: "File holding the token sent as authorization: Bearer <token>.") var authTokenFile: String?

    func run() async throws {
        let (descriptor, defaultPort) = try Catalog.method(method)
        let text = request == "-" ? String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self) : request
        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed])
        } catch {
            throw ValidationError("the request is not valid JSON: \(error.localizedDescription)")
        }
        let payload: [UInt8]
        do {
            payload = try ProtoJSON.encode(json, as: descriptor.inputDescriptor)
        } catch {
            throw ValidationError("\(descriptor.inputName): \(error)")
        }
        var metadata = Metadata()
        for header in headers {
            guard let eq = header.firstIndex(of: "="), eq != header.startIndex else { throw ValidationError("--header must be key=value, got \(header)") }
            metadata.add(String(header[..<eq]), String(header[header.index(after: eq)...]))
        }
        let client = try makeClient(address ?? "127.0.0.1:\(defaultPort)", tokenFile: authTokenFile)
        defer { client.close() }
        do {
            let response = try await client.call(descriptor, payload: payload, metadata: metadata, timeout: .seconds(timeout))
            let object = try ProtoJSON.decode(response, as: descriptor.outputDescriptor)
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
            say(String(decoding: data, as: UTF8.self))
        } catch let error as RPCError {
            FileHandle.standardError.write(Data("\(error.code): \(error.message)\n".utf8))
            throw ExitCode(1)
        }
    }
}

/// `arbiter list`: every service, method and request field.
struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List the services, their methods and the fields of each request.")

    @Flag(help: "Method names only.") var short = false

    func run() throws {
        for service in Catalog.services {
            say("\(service.name)  (default port \(service.port))")
            for method in service.methods {
                say("  \(method.method)(\(method.inputName)) returns \(method.outputName)\(method.isIdempotent ? "  [idempotent]" : "")")
                guard !short else { continue }
                for field in ProtoJSON.fields(of: method.inputDescriptor) {
                    say("      \(field.name): \(field.repeated ? "repeated " : "")\(field.type)")
                }
            }
        }
    }
}
