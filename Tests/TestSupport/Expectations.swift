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

/// Expects `body` to fail with `code` (and, when given, a message containing `message`).
public func expectCode(_ code: RPCError.Code, message: String? = nil, sourceLocation: SourceLocation = #_sourceLocation,
                       _ body: () async throws -> Void) async {
    do {
        try await body()
        Issue.record("expected \(code), got OK", sourceLocation: sourceLocation)
    } catch let error as RPCError {
        #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
        if let message { #expect(error.message.contains(message), "\(error.message)", sourceLocation: sourceLocation) }
    } catch {
        Issue.record("expected RPCError \(code), got \(error)", sourceLocation: sourceLocation)
    }
}

/// Polls until `condition` holds (at most `seconds`).
public func eventually(_ seconds: Double = 10, _ condition: @Sendable () async throws -> Bool) async throws -> Bool {
    let end = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < end {
        if try await condition() { return true }
        try await Task.sleep(for: .milliseconds(10))
    }
    return try await condition()
}

/// Waits until `condition` holds; records an issue when it does not within 10 s.
public func waitFor(sourceLocation: SourceLocation = #_sourceLocation, _ condition: @Sendable () async throws -> Bool) async throws {
    if !(try await eventually(10, condition)) { Issue.record("timed out waiting", sourceLocation: sourceLocation) }
}
