# Mail: an SES domain identity with DKIM, and SMTP credentials for behalf (BEHALF_SMTP_URL).
# SES accounts start in the sandbox (mail only to verified addresses): request production
# access in the SES console before users rely on re-authorisation mails.

resource "aws_ses_domain_identity" "mail" {
  domain = var.mail_domain
}

resource "aws_ses_domain_dkim" "mail" {
  domain = aws_ses_domain_identity.mail.domain
}

resource "aws_route53_record" "ses_verification" {
  count = var.route53_zone_id == null ? 0 : 1

  zone_id = var.route53_zone_id
  name    = "_amazonses.${var.mail_domain}"
  type    = "TXT"
  ttl     = 600
  records = [aws_ses_domain_identity.mail.verification_token]
}

resource "aws_route53_record" "ses_dkim" {
  count = var.route53_zone_id == null ? 0 : 3

  zone_id = var.route53_zone_id
  name    = "${aws_ses_domain_dkim.mail.dkim_tokens[count.index]}._domainkey.${var.mail_domain}"
  type    = "CNAME"
  ttl     = 600
  records = ["${aws_ses_domain_dkim.mail.dkim_tokens[count.index]}.dkim.amazonses.com"]
}

resource "aws_ses_domain_identity_verification" "mail" {
  count = var.route53_zone_id == null ? 0 : 1

  domain     = aws_ses_domain_identity.mail.id
  depends_on = [aws_route53_record.ses_verification]
}

# SES's SMTP interface authenticates with an IAM user's access key (converted to an SMTP
# password); it cannot use a role. The user may only send, only from this domain.
resource "aws_iam_user" "smtp" {
  #checkov:skip=CKV_AWS_273:SES SMTP authentication requires IAM user credentials; this user can do nothing but send mail from the behalf domain.
  name = "${var.name}-ses-smtp"
}

resource "aws_iam_group" "smtp" {
  name = "${var.name}-ses-smtp"
}

resource "aws_iam_user_group_membership" "smtp" {
  user   = aws_iam_user.smtp.name
  groups = [aws_iam_group.smtp.name]
}

data "aws_iam_policy_document" "smtp" {
  statement {
    sid       = "SendFromBehalfDomainOnly"
    actions   = ["ses:SendRawEmail"]
    resources = [aws_ses_domain_identity.mail.arn]
  }
}

resource "aws_iam_group_policy" "smtp" {
  name   = "send-mail"
  group  = aws_iam_group.smtp.name
  policy = data.aws_iam_policy_document.smtp.json
}

resource "aws_iam_access_key" "smtp" {
  user = aws_iam_user.smtp.name
}
