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
            server: server, limit: 8, logger: Logger(label: "backpressure"),
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
}
