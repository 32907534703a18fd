import Contracts
import Synchronization

/// grpc.health.v1.Health: answers `Check` for the whole process ("") and for each
/// service registered with `track`. Always served without authentication.
public final class HealthService: RPCService {
    private let statuses: Mutex<[String: HealthV1.HealthCheckResponse.ServingStatus]>

    /// Starts with the process ("") and `services` all SERVING.
    public init(services: [String] = []) {
        var initial: [String: HealthV1.HealthCheckResponse.ServingStatus] = ["": .serving]
        for service in services { initial[service] = .serving }
        statuses = Mutex(initial)
    }

    /// Sets the status reported for `service` ("" is the whole process).
    public func setStatus(_ status: HealthV1.HealthCheckResponse.ServingStatus, for service: String = "") {
        statuses.withLock { $0[service] = status }
    }

    /// Sets every tracked name to `status` (e.g. NOT_SERVING when draining).
    public func setAll(_ status: HealthV1.HealthCheckResponse.ServingStatus) {
        statuses.withLock { all in
            for key in all.keys { all[key] = status }
        }
    }

    public func status(for service: String) -> HealthV1.HealthCheckResponse.ServingStatus {
        statuses.withLock { $0[service] } ?? .serviceUnknown
    }

    public func register(in router: inout RPCRouter) {
        router.register(HealthV1.Health.check) { [self] request, _ in
            var response = HealthV1.HealthCheckResponse()
            response.status = status(for: request.service)
            return response
        }
    }
}
