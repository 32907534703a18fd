import RPC
import Testing

/// Expects `body` to fail with INVALID_ARGUMENT whose message starts with `field`
/// (the field-naming convention of every Arbiter RPC).
public func expectInvalid(_ field: String, sourceLocation: SourceLocation = #_sourceLocation,
                          _ body: () async throws -> Void) async {
    do {
        try await body()
        Issue.record("expected INVALID_ARGUMENT for \(field)", sourceLocation: sourceLocation)
    } catch let error as RPCError {
        #expect(error.code == .invalidArgument && error.message.hasPrefix(field), "\(error)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("unexpected \(error)", sourceLocation: sourceLocation)
    }
}
