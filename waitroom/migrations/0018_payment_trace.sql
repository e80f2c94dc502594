-- waitroom schema, version 18: the trace a payment was asked for in.
--
-- With tracing on, the confirm request stores its W3C traceparent with the payment it
-- creates; the payment worker's attempt (another process, seconds later) links to it, so an
-- operator follows one fan's purchase from the confirm to the charge and the tickets. NULL
-- with tracing off. A nullable column without a default: adding it rewrites nothing.
ALTER TABLE payments ADD COLUMN traceparent text;
