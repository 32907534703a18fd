import ArgumentParser
import Logging
import RPC

/// What distinguishes one Arbiter executable: its name, default ports and what it serves.
public protocol ServiceDefinition: Sendable {
    /// The executable's name, e.g. `arbiter-identity`.
    static var commandName: String { get }
    /// One line for `--help`.
    static var abstract: String { get }
    static var defaultPort: Int { get }
    static var defaultAdminPort: Int { get }
    /// Builds the service: opens and migrates its stores, returns its RPC services and
    /// background services. Runs before the RPC listener opens.
    static func makeServices(_ context: ServiceContext) async throws -> ServiceParts
    /// Where this service's handlers run. Default `.eventLoop`; services whose handlers
    /// block briefly on SQLite or compute choose `.concurrentPool`.
    static var handlerExecution: RPCServerConfiguration.HandlerExecution { get }
}

extension ServiceDefinition {
    public static var handlerExecution: RPCServerConfiguration.HandlerExecution { .eventLoop }
}

/// A service's event-loop threads unless `--event-loop-threads` says otherwise: one (its
/// handlers that block run on Swift's concurrent pool).
public let defaultEventLoopThreads = 1

/// The operator contract shared by every executable. Each flag can also be given in
/// the environment as `ARBITER_<FLAG>` (upper case, dashes as underscores); a flag
/// on the command line wins over the environment.
public struct ServiceOptions<Definition: ServiceDefinition>: ParsableArguments, Sendable {
    @Option(help: "Interface to listen on, RPC and admin. [env: ARBITER_HOST]")
    public var host: String = "127.0.0.1"

    @Option(help: "RPC (ttrpc) port; 0 picks a free one. [env: ARBITER_PORT]")
    public var port: Int = Definition.defaultPort

    @Option(help: "HTTP admin port: /healthz, /readyz, /metrics; 0 picks a free one. [env: ARBITER_ADMIN_PORT]")
    public var adminPort: Int = Definition.defaultAdminPort

    @Option(help: "Directory for this service's SQLite store; created if missing. [env: ARBITER_DATA_DIR]")
    public var dataDir: String = "./data"

    @Option(help: "File holding the bearer token every call must carry (health excepted); no auth when unset. [env: ARBITER_AUTH_TOKEN_FILE]")
    public var authTokenFile: String?

    @Option(help: "Identity service address, host:port. [env: ARBITER_IDENTITY]")
    public var identity: PeerAddress?

    @Option(help: "Profile service address, host:port. [env: ARBITER_PROFILE]")
    public var profile: PeerAddress?

    @Option(help: "Routing service address, host:port. [env: ARBITER_ROUTING]")
    public var routing: PeerAddress?

    @Option(help: "JSON file with service-specific settings (a section per service, e.g. \"identity\"). [env: ARBITER_CONFIG]")
    public var config: String?

    @Option(help: "trace, debug, info, notice, warning, error or critical. [env: ARBITER_LOG_LEVEL]")
    public var logLevel: Logger.Level = .info

    @Option(help: "text or json (one object per line). [env: ARBITER_LOG_FORMAT]")
    public var logFormat: LogFormat = .text

    @Option(help: "Open connections per process. [env: ARBITER_MAX_CONNECTIONS]")
    public var maxConnections: Int = 1024

    @Option(help: "Requests in flight per connection before the server stops reading it. [env: ARBITER_MAX_IN_FLIGHT]")
    public var maxInFlight: Int = 256

    @Option(help: "Largest request in bytes. [env: ARBITER_MAX_MESSAGE_SIZE]")
    public var maxMessageSize: Int = 4 << 20

    @Option(help: "Seconds before a connection with nothing in flight and no frame received is closed; 0 never (containerd's Go client does not re-dial). [env: ARBITER_IDLE_TIMEOUT]")
    public var idleTimeout: Int = 0

    @Option(help: "Seconds a frame begun may take to arrive whole before its connection is closed. [env: ARBITER_FRAME_TIMEOUT]")
    public var frameTimeout: Int = 60

    @Option(help: "Seconds to finish in-flight calls after SIGTERM/SIGINT. [env: ARBITER_GRACE_PERIOD]")
    public var gracePeriod: Int = 10

    @Option(help: "Event-loop threads. [env: ARBITER_EVENT_LOOP_THREADS]")
    public var eventLoopThreads: Int = defaultEventLoopThreads

    @Option(help: "Stop gracefully once the process with this pid is no longer this one's parent (`arbiter up` passes its own, so its services do not outlive it, even after a kill -9). [env: ARBITER_PARENT_PID]")
    public var parentPid: Int?

    public init() {}

    /// Long names of every option, for the environment mapping.
    static var optionNames: [String] {
        ["host", "port", "admin-port", "data-dir", "auth-token-file", "identity", "profile", "routing",
         "config", "log-level", "log-format", "max-connections", "max-in-flight", "max-message-size", "idle-timeout", "frame-timeout",
         "grace-period", "event-loop-threads", "parent-pid"]
    }

    public mutating func validate() throws {
        func check(_ flag: String, _ value: Int, _ range: ClosedRange<Int>) throws {
            guard range.contains(value) else {
                throw ValidationError("--\(flag) must be in \(range.lowerBound)...\(range.upperBound), got \(value)")
            }
        }
        guard !host.isEmpty else { throw ValidationError("--host must not be empty") }
        try check("port", port, 0...65535)
        try check("admin-port", adminPort, 0...65535)
        if port != 0 && port == adminPort { throw ValidationError("--port and --admin-port must differ, both are \(port)") }
        try check("max-connections", maxConnections, 1...1_000_000)
        try check("max-in-flight", maxInFlight, 1...100_000)
        try check("max-message-size", maxMessageSize, 1024...(64 << 20))
        try check("idle-timeout", idleTimeout, 0...86_400)
        try check("frame-timeout", frameTimeout, 1...3600)
        try check("grace-period", gracePeriod, 0...3600)
        try check("event-loop-threads", eventLoopThreads, 1...256)
        if let parentPid { try check("parent-pid", parentPid, 1...Int(Int32.max)) }
        guard !dataDir.isEmpty else { throw ValidationError("--data-dir must not be empty") }
    }

    /// `arguments` with every `ARBITER_<FLAG>` from `environment` appended for flags not given.
    public static func arguments(_ arguments: [String], environment: [String: String]) -> [String] {
        var result = arguments
        for name in optionNames {
            let given = arguments.contains { $0 == "--\(name)" || $0.hasPrefix("--\(name)=") }
            let key = "ARBITER_" + String(name.uppercased().map { $0 == "-" ? "_" : $0 })
            if !given, let value = environment[key] {
                result.append("--\(name)=\(value)")
            }
        }
        return result
    }
}

/// A peer's `host:port`.
public struct PeerAddress: ExpressibleByArgument, Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public init?(argument: String) {
        guard let colon = argument.lastIndex(of: ":") else { return nil }
        let host = String(argument[..<colon])
        guard !host.isEmpty, let port = Int(argument[argument.index(after: colon)...]), (1...65535).contains(port) else {
            return nil
        }
        self.init(host: host, port: port)
    }

    public var description: String { "\(host):\(port)" }
    public var defaultValueDescription: String { description }
}

public enum LogFormat: String, ExpressibleByArgument, Sendable, CaseIterable {
    case text, json
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
