import Metrics
import Synchronization

/// The server's metrics, through swift-metrics (exported by the admin port's /metrics):
/// - `rpc_server_requests_total{rpc_service, rpc_method, rpc_code}`: finished calls (`rpc_code`
///   a gRPC code's name, or `OTHER` for a code gRPC does not define)
/// - `rpc_server_duration_seconds{rpc_service, rpc_method}`: handling time, a histogram
/// - `rpc_server_in_flight_requests`: calls being handled
/// - `rpc_server_connections`: open connections
/// - `rpc_server_rejected_connections_total`: connections closed because of `maxConnections`
final class RPCServerMetrics: Sendable {
    let inFlight = Meter(label: "rpc_server_in_flight_requests")
    let connections = Meter(label: "rpc_server_connections")
    let rejectedConnections = Counter(label: "rpc_server_rejected_connections_total")

    private struct Key: Hashable {
        var service: String
        var method: String
        var code: Int32
    }

    private let counters = Mutex<[Key: Counter]>([:])
    private let timers = Mutex<[String: Timer]>([:])

    func record(service: String, method: String, code: RPCError.Code, duration: Duration) {
        // Only registered methods get their own series; anything else is folded into one, so a
        // client cannot grow the label space without bound. Codes gRPC does not define (a
        // handler may pass on one a client chose, as Echo's fail_code) share `OTHER`.
        let known = RPCError.Code.names.indices.contains(Int(code.rawValue))
        let key = Key(service: service, method: method, code: known ? code.rawValue : -1)
        let counter = counters.withLock { counters in
            if let counter = counters[key] { return counter }
            let counter = Counter(label: "rpc_server_requests_total", dimensions: [
                ("rpc_service", service), ("rpc_method", method), ("rpc_code", known ? code.description : "OTHER"),
            ])
            counters[key] = counter
            return counter
        }
        counter.increment()
        let timer = timers.withLock { timers in
            let name = service + "/" + method
            if let timer = timers[name] { return timer }
            let timer = Timer(label: "rpc_server_duration_seconds", dimensions: [
                ("rpc_service", service), ("rpc_method", method),
            ], preferredDisplayUnit: .seconds)
            timers[name] = timer
            return timer
        }
        timer.recordNanoseconds(duration.nanoseconds)
    }
}
