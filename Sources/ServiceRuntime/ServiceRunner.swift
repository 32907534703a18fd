import ArgumentParser
import Logging
import Metrics
import NIOCore
import NIOPosix
import Prometheus
import RPC
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What a service is built from: its validated options, a logger, the event loops,
/// its auth token, and clients for the peers it was given.
public struct ServiceContext: Sendable {
    public var logger: Logger
    public var dataDirectory: String
    public var authToken: String?
    public var group: any EventLoopGroup
    public var identity: RPCClient?
    public var profile: RPCClient?
    public var routing: RPCClient?
    /// The raw `--config` file, for services that decode their section with `Codable`.
    public var configurationData: [UInt8]?

    /// Decodes the `section` of `--config` (e.g. "identity") as `T`, or returns `T()`'s defaults.
    /// A malformed file or section stops the service with a message naming it.
    public func section<T: Codable>(_ section: String, as type: T.Type, default value: T) throws -> T {
        guard let data = configurationData else { return value }
        return try ConfigFile.decode(section, from: data, as: type) ?? value
    }

    /// The error that stops a service at start over its configuration (`--config: <message>`).
    public func configurationError(_ message: String) -> any Error { ValidationError("--config: \(message)") }
}

/// What a service consists of.
public struct ServiceParts: Sendable {
    /// RPC services served on the RPC port (health is added by the runtime).
    public var rpcServices: [any RPCService]
    /// Long-running background work (dispatchers, feed followers), shut down after the RPC server.
    public var background: [any Service]

    public init(rpcServices: [any RPCService] = [], background: [any Service] = []) {
        self.rpcServices = rpcServices
        self.background = background
    }
}

/// The command every Arbiter executable runs: parse the operator flags (and their
/// `ARBITER_*` environment twins), build the service, serve until SIGTERM/SIGINT,
/// drain, exit 0.
public struct ServiceCommand<Definition: ServiceDefinition>: AsyncParsableCommand {
    public static var configuration: CommandConfiguration {
        CommandConfiguration(commandName: Definition.commandName, abstract: Definition.abstract)
    }

    @OptionGroup public var options: ServiceOptions<Definition>

    public init() {}

    /// Entry point for an executable's `@main`.
    public static func start() async {
        var environment: [String: String] = [:]
        var pointer = environ
        while let entry = pointer.pointee {
            let pair = String(cString: entry)
            if let eq = pair.firstIndex(of: "=") {
                environment[String(pair[..<eq])] = String(pair[pair.index(after: eq)...])
            }
            pointer += 1
        }
        let arguments = ServiceOptions<Definition>.arguments(Array(CommandLine.arguments.dropFirst()), environment: environment)
        await main(arguments)
    }

    public func run() async throws {
        let runtime = try ServiceRuntime(options: options)
        try await runtime.run()
    }
}

/// Assembles and runs one service process. Also usable in-process (tests).
public final class ServiceRuntime<Definition: ServiceDefinition>: Sendable {
    public let options: ServiceOptions<Definition>
    public let logger: Logger
    public let registry: PrometheusCollectorRegistry
    let group: MultiThreadedEventLoopGroup
    let authToken: String?
    private let started = Mutex<(rpc: RPCServer?, admin: AdminServer?)>((nil, nil))

    /// Validates what can only be checked at start (the token file, the data directory)
    /// and bootstraps logging and metrics once per process.
    public init(options: ServiceOptions<Definition>) throws {
        self.options = options
        Self.bootstrapOnce(options)
        var logger = Logger(label: Definition.commandName)
        logger.logLevel = options.logLevel
        self.logger = logger
        self.registry = Self.sharedRegistry
        if let file = options.authTokenFile {
            guard let contents = readFile(file) else {
                throw ValidationError("--auth-token-file: cannot read \(file)")
            }
            let token = contents.trimmingWhitespace()
            guard !token.isEmpty else { throw ValidationError("--auth-token-file: \(file) is empty") }
            authToken = token
        } else {
            authToken = nil
        }
        guard makeDirectories(options.dataDir) else {
            throw ValidationError("--data-dir: cannot create directory \(options.dataDir)")
        }
        if let parent = options.parentPid, getppid() != pid_t(parent) {
            throw ValidationError("--parent-pid: \(parent) is not this process's parent (\(getppid()))")
        }
        group = MultiThreadedEventLoopGroup(numberOfThreads: options.eventLoopThreads)
    }

    /// The RPC server's address, once it listens.
    public func rpcAddress() async throws -> SocketAddress {
        while true {
            if let server = started.withLock({ $0.rpc }) { return try await server.listeningAddress() }
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    /// The admin server's address, once it listens.
    public func adminAddress() async throws -> SocketAddress {
        while true {
            if let server = started.withLock({ $0.admin }) { return try await server.listeningAddress() }
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    public func run() async throws {
        // Held until run returns: no second process of this service opens its store.
        let lock = try DataDirectoryLock(directory: options.dataDir, holder: Definition.commandName)
        defer { withExtendedLifetime(lock) {} }
        // Peers' answers may be as large as this service's own (`--max-message-size`).
        var peerConfiguration = RPCClientConfiguration.withToken(authToken)
        peerConfiguration.maxMessageSize = options.maxMessageSize
        func client(_ peer: PeerAddress?) -> RPCClient? {
            peer.map { RPCClient(host: $0.host, port: $0.port, configuration: peerConfiguration, group: group) }
        }
        var configData: [UInt8]?
        if let file = options.config {
            guard let text = readFile(file) else { throw ValidationError("--config: cannot read \(file)") }
            configData = Array(text.utf8)
        }
        let context = ServiceContext(
            logger: logger, dataDirectory: options.dataDir, authToken: authToken, group: group,
            identity: client(options.identity), profile: client(options.profile), routing: client(options.routing),
            configurationData: configData)
        // The admin port listens first: /healthz answers (and /readyz says not ready) while
        // the stores open, migrate and recover, which after a crash can take a while.
        let readiness = ReadinessGate()
        let admin = AdminServer(host: options.host, port: options.adminPort, registry: registry, logger: logger, group: group) {
            readiness.isReady
        }
        try await admin.bind()
        started.withLock { $0.admin = admin }
        let logger = self.logger
        let serving = Serving { [self] in
            // Stores open and migrate here, before the RPC port listens. Nothing can stop
            // that midway (a recovery may take minutes), so SIGTERM or a parent gone meanwhile
            // ends the process at once, as SIGTERM did before the admin port listened this
            // early: what the stores committed is kept, the rest resumes at the next start.
            let parts = try await withGracefulShutdownHandler {
                try await Definition.makeServices(context)
            } onGracefulShutdown: {
                logger.notice("stopping while the stores open: exiting now; the next start resumes")
                _exit(0)
            }
            guard !Task.isShuttingDownGracefully && !Task.isCancelled else { return }
            var router = RPCRouter()
            for service in parts.rpcServices { router.register(service) }
            let health = HealthService(services: router.serviceNames + ["grpc.health.v1.Health"])
            router.register(health)

            var configuration = RPCServerConfiguration()
            configuration.host = options.host
            configuration.port = options.port
            configuration.maxMessageSize = options.maxMessageSize
            configuration.maxInFlightPerConnection = options.maxInFlight
            configuration.maxConnections = options.maxConnections
            configuration.idleTimeout = .seconds(options.idleTimeout)
            configuration.frameTimeout = .seconds(options.frameTimeout)
            configuration.authToken = authToken
            configuration.handlerExecution = Definition.handlerExecution
            let rpc = RPCServer(configuration: configuration, router: router, logger: logger, group: group)
            started.withLock { $0.rpc = rpc }
            readiness.markReadyWhenListening(rpc, health: health)
            // Shutdown runs in reverse order: readiness flips first, then the RPC server
            // drains, then the background work stops (and the admin port, outside, last).
            let services = parts.background.map { ServiceGroupConfiguration.ServiceConfiguration(service: $0) }
                + [.init(service: rpc), .init(service: readiness)]
            try await ServiceGroup(configuration: ServiceGroupConfiguration(services: services, logger: logger)).run()
        }
        // The parent watch, last, stops first; when it sees its parent gone it shuts the group
        // down gracefully, as SIGTERM does.
        let watch = options.parentPid.map {
            ServiceGroupConfiguration.ServiceConfiguration(service: ParentWatch(parent: pid_t($0), logger: logger),
                                                           successTerminationBehavior: .gracefullyShutdownGroup)
        }
        var lifecycle = ServiceGroupConfiguration(
            services: [.init(service: admin), .init(service: serving)] + (watch.map { [$0] } ?? []),
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger)
        lifecycle.maximumGracefulShutdownDuration = .seconds(options.gracePeriod)
        lifecycle.maximumCancellationDuration = .seconds(5)
        try await ServiceGroup(configuration: lifecycle).run()
        try? await self.group.shutdownGracefully()
        logger.info("stopped")
    }

    private static func bootstrapOnce(_ options: ServiceOptions<Definition>) {
        let first = ProcessBootstrap.done.withLock { done in
            defer { done = true }
            return !done
        }
        guard first else { return }
        let level = options.logLevel
        switch options.logFormat {
        case .text:
            LoggingSystem.bootstrap { label in
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            }
        case .json:
            LoggingSystem.bootstrap { label in
                var handler = JSONLogHandler(label: label)
                handler.logLevel = level
                return handler
            }
        }
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: sharedRegistry))
    }

    private static var sharedRegistry: PrometheusCollectorRegistry { ProcessBootstrap.registry }
}

/// Logging and metrics are bootstrapped once per process.
enum ProcessBootstrap {
    static let registry = PrometheusCollectorRegistry()
    static let done = Mutex(false)
}

/// Ready once the RPC server listens; not ready (and health NOT_SERVING) from the
/// moment graceful shutdown begins.
final class ReadinessGate: Service, Sendable {
    private let health = Mutex<HealthService?>(nil)
    private let ready = Atomic<Bool>(false)

    var isReady: Bool { ready.load(ordering: .relaxed) }

    func markReadyWhenListening(_ server: RPCServer, health: HealthService) {
        self.health.withLock { $0 = health }
        Task {
            if (try? await server.listeningAddress()) != nil { ready.store(true, ordering: .relaxed) }
        }
    }

    func run() async throws {
        try? await gracefulShutdown()
        ready.store(false, ordering: .relaxed)
        health.withLock { $0?.setAll(.notServing) }
    }
}

/// The service's own part, run beside the admin port: `body` opens the stores, then serves
/// until the graceful shutdown it is given.
struct Serving: Service {
    let body: @Sendable () async throws -> Void
    func run() async throws { try await body() }
}

/// Returns (ending the service gracefully, with `successTerminationBehavior`
/// `.gracefullyShutdownGroup`) once `parent` is no longer this process's parent: it exited,
/// even by `kill -9`, and this process was handed to init. Checked four times a second.
struct ParentWatch: Service {
    let parent: pid_t
    let logger: Logger

    func run() async {
        let gone = await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                if getppid() != parent { return true }
                try? await Task.sleep(for: .milliseconds(250))
            }
            return false
        }
        if gone { logger.warning("parent process exited; stopping", metadata: ["parent_pid": "\(parent)"]) }
    }
}

/// An exclusive `flock` on `<directory>/<holder>.lock`, which holds the pid of the process
/// that has it. Two processes of one service on one data directory would both write its
/// store and each trust its own memory of it (the profile service's dirty persons, the
/// decision service's caps): the second is refused at start instead. The lock goes with
/// the process, however it ends; the file stays.
final class DataDirectoryLock: Sendable {
    let descriptor: Int32

    init(directory: String, holder: String) throws {
        let path = directory + "/" + holder + ".lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ValidationError("--data-dir: cannot open \(path): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let reason = errno
            let pid = readFile(path)?.trimmingWhitespace() ?? ""
            close(fd)
            guard reason == EWOULDBLOCK else {
                throw ValidationError("--data-dir: cannot lock \(path): \(String(cString: strerror(reason)))")
            }
            throw ValidationError("--data-dir: \(directory) is in use by another \(holder)\(pid.isEmpty ? "" : " (pid \(pid))"); "
                                  + "one store takes one process")
        }
        let pid = Array("\(getpid())\n".utf8)
        if ftruncate(fd, 0) == 0 { _ = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) } }
        descriptor = fd
    }

    deinit { close(descriptor) }
}

func readFile(_ path: String) -> String? {
    guard let file = fopen(path, "r") else { return nil }
    defer { fclose(file) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buffer, 1, buffer.count, file)
        if n > 0 { bytes.append(contentsOf: buffer[0..<n]) }
        if n < buffer.count { break }
    }
    return String(decoding: bytes, as: UTF8.self)
}

func makeDirectories(_ path: String) -> Bool {
    var current = path.hasPrefix("/") ? "/" : ""
    for component in path.split(separator: "/") {
        current += component + "/"
        if mkdir(current, 0o755) != 0 && errno != EEXIST { return false }
    }
    var info = stat()
    return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
}

extension String {
    func trimmingWhitespace() -> String {
        let scalars = unicodeScalars
        guard let start = scalars.firstIndex(where: { !$0.properties.isWhitespace }) else { return "" }
        let end = scalars.lastIndex(where: { !$0.properties.isWhitespace })!
        return String(scalars[start...end])
    }
}
