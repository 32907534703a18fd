import Contracts
import RPC

/// arbiter.echo.v1.Echo: the conformance service client authors test against.
/// It echoes the message, the blob and the metadata (except `authorization`),
/// reports the deadline budget it saw, waits `delay_ms` (cut short by the
/// deadline) and fails on request with `fail_code`.
public struct EchoService: RPCService {
    public init() {}

    public func register(in router: inout RPCRouter) {
        router.register(EchoV1.Echo.echo) { request, context in
            try await Self.echo(request, context)
        }
    }

    static func echo(_ request: EchoV1.EchoRequest, _ context: RPCContext) async throws -> EchoV1.EchoResponse {
        guard request.delayMs >= 0 else {
            throw RPCError.invalidArgument(field: "delay_ms", "must not be negative, got \(request.delayMs)")
        }
        guard request.delayMs <= 600_000 else {
            throw RPCError.invalidArgument(field: "delay_ms", "must be at most 600000 (10 minutes), got \(request.delayMs)")
        }
        var response = EchoV1.EchoResponse()
        response.deadlineRemainingNanos = context.remainingBudget.map { max(1, $0.nanoseconds) } ?? 0
        if request.delayMs > 0 {
            try await Task.sleep(for: .milliseconds(request.delayMs))
        }
        if request.failCode != 0 {
            throw RPCError(RPCError.Code(rawValue: request.failCode), request.failMessage)
        }
        response.message = request.message
        response.blob = request.blob
        // Stable sort: equal keys keep their order.
        response.metadata = context.metadata.entries.enumerated()
            .filter { $0.element.key != "authorization" }
            .sorted { ($0.element.key, $0.offset) < ($1.element.key, $1.offset) }
            .map {
                var entry = EchoV1.MetadataEntry()
                entry.key = $0.element.key
                entry.value = $0.element.value
                return entry
            }
        return response
    }
}
