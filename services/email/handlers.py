"""Email: send the order confirmation over SMTP.

The SMTP send comes before any database statement and before the commit: with concurrent
lanes the runtime begins the transaction at the first statement, so sends for different orders
run in parallel without holding the database's write lock. A crash between the server's accept
and our commit resends the mail on redelivery; its Message-ID is derived from the event id, so
the resend is recognisable (and dropped by receivers that dedup on it).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.email.mailer import OutgoingMail, message_id_for
from services.email.tables import sent_emails
from services.runtime.events import ConfirmationEmailSent, Event, OrderCreated
from services.runtime.handler import UnitOfWork


@dataclass(frozen=True)
class EmailDeps:
    mailer: object  # SmtpMailer in production, RecordingMailer in unit tests
    sender: str


def confirmation_mail(event: OrderCreated, event_id: str, sender: str) -> OutgoingMail:
    lines = "\n".join(f"  {line.quantity} x {line.sku} @ {line.unit_price} {event.currency}" for line in event.lines)
    text = (f"Thank you for your order {event.order_id}.\n\n{lines}\n\n"
            f"Total: {event.total} {event.currency}\n\nWe will let you know when it ships.\n")
    return OutgoingMail(message_id=message_id_for(event_id), sender=sender, recipient=event.customer_email,
                        subject=f"Your order {event.order_id}", text=text)


def send_confirmation(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
    mail = confirmation_mail(event, uow.envelope.event_id, uow.deps.sender)
    uow.deps.mailer.send(mail)
    uow.conn.execute(sent_emails.insert().values(order_id=event.order_id, message_id=mail.message_id,
                                                 recipient=mail.recipient, sent_at=uow.now))
    return [ConfirmationEmailSent(order_id=event.order_id, message_id=mail.message_id, recipient=mail.recipient,
                                  sent_at=uow.now)]


HANDLERS = {OrderCreated: [send_confirmation]}
