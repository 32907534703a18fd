import Logging
import NIOCore
import NIOEmbedded
@testable import RPC
import Testing

/// Counts the reads a handler passes towards the socket.
final class ReadCounter: ChannelOutboundHandler {
    typealias OutboundIn = Any
    var reads = 0
    func read(context: ChannelHandlerContext) {
        reads += 1
        context.read()
    }
}

@Suite("RPC server backpressure")
struct BackpressureTests {
    @Test("a connection whose answers are not being read stops reading requests until they drain")
    func unreadAnswersHoldReads() throws {
        let channel = EmbeddedChannel()
        let counter = ReadCounter()
        let server = RPCServer(configuration: RPCServerConfiguration(), router: RPCRouter(), logger: Logger(label: "backpressure"))
        try channel.pipeline.syncOperations.addHandler(counter)
        try channel.pipeline.syncOperations.addHandler(RPCConnectionHandler(
            server: server, limit: 8, frameTimeout: .seconds(60), logger: Logger(label: "backpressure"),
            executor: EventLoopTaskExecutor(channel.embeddedEventLoop), handlersOnEventLoop: true))

        channel.read()
        #expect(counter.reads == 1)
        // The send buffer over its high-water mark (a client that sends and never reads): before,
        // reads went on and every answer waited in memory.
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        channel.read()
        #expect(counter.reads == 1)
        // It drained: the held read goes on.
        channel.isWritable = true
        channel.pipeline.fireChannelWritabilityChanged()
        #expect(counter.reads == 2)
        channel.read()
        #expect(counter.reads == 3)
        _ = try channel.finish()
    }

    /// A connection with the server's decoder and handler, on an embedded loop whose time
    /// the test moves.
    func framedChannel(frameTimeout: TimeAmount) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        let server = RPCServer(configuration: RPCServerConfiguration(), router: RPCRouter(), logger: Logger(label: "frames"))
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(TTRPCFrameDecoder(maxPayloadSize: 4 << 20)))
        try channel.pipeline.syncOperations.addHandler(RPCConnectionHandler(
            server: server, limit: 8, frameTimeout: frameTimeout, logger: Logger(label: "frames"),
            executor: EventLoopTaskExecutor(channel.embeddedEventLoop), handlersOnEventLoop: true))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    @Test("a frame begun must arrive whole within the frame timeout, however its bytes trickle; a quiet connection between frames stays")
    func frameTimeout() throws {
        let channel = try framedChannel(frameTimeout: .seconds(60))
        // A request header announcing 100 bytes, then one byte every 10 s: before, each byte
        // was activity and the connection (a slot of maxConnections) was held for ever.
        try channel.writeInbound(ByteBuffer(bytes: [0, 0, 0, 100, 0, 0, 0, 1, 1, 0]))
        for _ in 0..<5 {
            channel.embeddedEventLoop.advanceTime(by: .seconds(10))
            try channel.writeInbound(ByteBuffer(bytes: [0]))
        }
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(11))
        #expect(!channel.isActive)

        // Quiet between frames: nothing is pending, nothing times out.
        let quiet = try framedChannel(frameTimeout: .seconds(60))
        quiet.embeddedEventLoop.advanceTime(by: .seconds(3600))
        #expect(quiet.isActive)
        // Half a header, then nothing.
        try quiet.writeInbound(ByteBuffer(bytes: [0, 0]))
        quiet.embeddedEventLoop.advanceTime(by: .seconds(61))
        #expect(!quiet.isActive)
    }

    @Test("a busy connection whose reads always end inside a frame is not closed: each frame has its own clock")
    func frameTimeoutPerFrame() throws {
        let channel = try framedChannel(frameTimeout: .seconds(60))
        // Under load a read often ends partway into the next frame. Each write below completes
        // the frame begun before it and begins another, so part of a frame is always waiting:
        // before, the clock ran from the first such byte and closed the connection after 60 s
        // of steady traffic (seen in a 120 s benchmark run: every connection closed).
        func header(_ stream: UInt32) -> [UInt8] { [0, 0, 0, 0] + withUnsafeBytes(of: stream.bigEndian, Array.init) + [1, 0] }
        try channel.writeInbound(ByteBuffer(bytes: Array(header(1).prefix(4))))
        var stream: UInt32 = 1
        for _ in 0..<12 {
            channel.embeddedEventLoop.advanceTime(by: .seconds(10))
            try channel.writeInbound(ByteBuffer(bytes: Array(header(stream).dropFirst(4)) + Array(header(stream + 2).prefix(4))))
            stream += 2
        }
        #expect(channel.isActive)
        // The last frame begun then stalls: closed once it has waited the timeout.
        channel.embeddedEventLoop.advanceTime(by: .seconds(50))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(11))
        #expect(!channel.isActive)
    }

    @Test("the frame timeout does not run while the server holds reads back (its own backpressure, not the client's delay)")
    func frameTimeoutPausedWhileReadsHeld() throws {
        let channel = try framedChannel(frameTimeout: .seconds(60))
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        try channel.writeInbound(ByteBuffer(bytes: [0, 0, 0, 100]))
        channel.read()  // held: the answers are not being read
        channel.embeddedEventLoop.advanceTime(by: .seconds(120))
        #expect(channel.isActive)
        channel.isWritable = true
        channel.pipeline.fireChannelWritabilityChanged()  // reads flow: the clock runs again
        channel.embeddedEventLoop.advanceTime(by: .seconds(61))
        #expect(!channel.isActive)
    }
}
